// Shim: lets nvcc compile `#include <hip/hip_runtime.h>` in kernels/*.hip.
#pragma once
#include "../../hip_compat.h"
