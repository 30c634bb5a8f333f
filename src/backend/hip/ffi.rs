//! The result layer: every HIP runtime status becomes a typed [`HipError`]
//! that names the call that failed.
//!
//! Owns: the conversion from `hipError_t` and the re-export of the raw
//! bindings (`hip-sys`) for the safe layer. Must not touch: resource
//! ownership (see `runtime`) or launches (see `launch`).

use std::ffi::CStr;

pub(crate) use hip_sys::hiprt as sys;

use crate::backend::BackendError;

/// A failed HIP runtime call.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call} failed: {name} ({code}): {message}")]
pub struct HipError {
    /// The runtime function, e.g. `"hipMalloc"`.
    pub call: &'static str,
    /// The raw `hipError_t` value.
    pub code: u32,
    /// The status's name, e.g. `"hipErrorNoDevice"`.
    pub name: String,
    /// The runtime's description of it.
    pub message: String,
}

impl HipError {
    /// Whether the status means "no usable device" rather than a fault.
    pub fn is_no_device(&self) -> bool {
        matches!(
            self.name.as_str(),
            "hipErrorNoDevice" | "hipErrorInsufficientDriver" | "hipErrorNoBinaryForGpu"
        ) || self.code == sys::hipError_t::hipErrorNoDevice as u32
    }
}

impl From<HipError> for BackendError {
    fn from(e: HipError) -> Self {
        BackendError::Device(e.to_string())
    }
}

fn static_str(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::from("(no description)");
    }
    // SAFETY: hipGetErrorName/hipGetErrorString return pointers to static,
    // NUL-terminated strings owned by the runtime (never freed).
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

/// `Ok(())` for `hipSuccess`, else the typed error for `call`.
pub(crate) fn check(call: &'static str, status: sys::hipError_t) -> Result<(), HipError> {
    if status == sys::hipError_t::hipSuccess {
        return Ok(());
    }
    // SAFETY: both functions accept any status value and only return static strings.
    let (name, message) = unsafe { (sys::hipGetErrorName(status), sys::hipGetErrorString(status)) };
    Err(HipError {
        call,
        code: status as u32,
        name: static_str(name),
        message: static_str(message),
    })
}
