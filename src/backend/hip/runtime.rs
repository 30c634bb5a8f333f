//! The safe layer over the HIP runtime: devices, RAII device buffers, pinned
//! host buffers, streams, events, and modules loaded from embedded code
//! objects.
//!
//! Owns: every HIP resource's lifetime (created in a constructor, released in
//! `Drop`) and the bounds of every copy. Must not touch: kernel arguments
//! (see `launch`) or the forward's plan (see `device`).
//!
//! Asynchronous copies borrow their host buffer only until the caller waits
//! on the stream; [`Stream`]'s copy methods are therefore `unsafe`-free only
//! for pinned buffers owned by the same session, which never touches them
//! between a copy and its wait (the session is `&mut` for the whole forward).
//! Releasing memory still in use by queued work is safe in HIP: `hipFree` and
//! `hipHostFree` synchronise the device first.

use std::ffi::{CStr, c_void};
use std::marker::PhantomData;

use super::ffi::{HipError, check, sys};

/// Number of visible devices; `hipErrorNoDevice` is reported as an error so
/// the caller can say why none is used.
pub(crate) fn device_count() -> Result<usize, HipError> {
    let mut n: std::ffi::c_int = 0;
    // SAFETY: `n` is a valid out-pointer for the duration of the call.
    check("hipGetDeviceCount", unsafe { sys::hipGetDeviceCount(&mut n) })?;
    Ok(n.max(0) as usize)
}

/// Makes `device` current for this thread (HIP's current device is
/// per-thread, and workers run on their own threads).
pub(crate) fn set_device(device: i32) -> Result<(), HipError> {
    // SAFETY: plain value argument; an invalid id is reported as an error.
    check("hipSetDevice", unsafe { sys::hipSetDevice(device) })
}

/// The device's marketing name and total memory in bytes.
pub(crate) fn device_info(device: i32) -> Result<(String, usize), HipError> {
    let mut name = [0 as std::ffi::c_char; 256];
    // SAFETY: the buffer is 256 bytes and its length is passed; HIP writes a
    // NUL-terminated string of at most that length.
    check("hipDeviceGetName", unsafe {
        sys::hipDeviceGetName(name.as_mut_ptr(), name.len() as i32, device)
    })?;
    name[name.len() - 1] = 0;
    // SAFETY: the buffer is NUL-terminated (forced above).
    let name = unsafe { CStr::from_ptr(name.as_ptr()) }
        .to_string_lossy()
        .trim()
        .to_string();
    let mut bytes = 0usize;
    // SAFETY: `bytes` is a valid out-pointer.
    check("hipDeviceTotalMem", unsafe {
        sys::hipDeviceTotalMem(&mut bytes, device)
    })?;
    Ok((name, bytes))
}

/// Bytes in use on `device` (total minus free), as the driver reports it.
/// Makes `device` current for the calling thread.
pub(crate) fn memory_used(device: i32) -> Result<u64, HipError> {
    set_device(device)?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: both are valid out-pointers for the duration of the call.
    check("hipMemGetInfo", unsafe { sys::hipMemGetInfo(&mut free, &mut total) })?;
    Ok(total.saturating_sub(free) as u64)
}

/// Element types that may live in device memory (plain old data).
pub(crate) trait Pod: Copy + Send + Sync + 'static {}
impl Pod for f32 {}
impl Pod for i32 {}
impl Pod for u32 {}

/// `len` elements of device memory on the device current at allocation.
pub(crate) struct DeviceBuffer<T: Pod> {
    ptr: *mut T,
    len: usize,
    _t: PhantomData<T>,
}

// SAFETY: a device allocation is a handle to GPU memory; the host never
// dereferences `ptr`, and HIP allows any thread to use it.
unsafe impl<T: Pod> Send for DeviceBuffer<T> {}
// SAFETY: shared references only hand the pointer to HIP calls/kernels that
// read it (weights) or to the owning session's stream.
unsafe impl<T: Pod> Sync for DeviceBuffer<T> {}

impl<T: Pod> DeviceBuffer<T> {
    /// Uninitialised device memory for `len` elements (at least one byte is
    /// allocated so the pointer is never null).
    pub(crate) fn new(len: usize) -> Result<Self, HipError> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: `p` is a valid out-pointer; on success it owns `bytes` bytes.
        check("hipMalloc", unsafe { sys::hipMalloc(&mut p, bytes) })?;
        Ok(DeviceBuffer {
            ptr: p.cast(),
            len,
            _t: PhantomData,
        })
    }

    /// A device copy of `data` (synchronous).
    pub(crate) fn from_slice(data: &[T]) -> Result<Self, HipError> {
        let buf = DeviceBuffer::<T>::new(data.len())?;
        if !data.is_empty() {
            // SAFETY: the destination holds `data.len()` elements; the source
            // is a live host slice of that size. The binding's source pointer
            // is `*mut` but HIP only reads it.
            check("hipMemcpyHtoD", unsafe {
                sys::hipMemcpyHtoD(
                    buf.ptr.cast(),
                    data.as_ptr() as *mut c_void,
                    std::mem::size_of_val(data),
                )
            })?;
        }
        Ok(buf)
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The device address of element `offset` (for kernel arguments).
    pub(crate) fn ptr_at(&self, offset: usize) -> *mut T {
        assert!(
            offset <= self.len,
            "device offset {offset} past the buffer's {} elements",
            self.len
        );
        self.ptr.wrapping_add(offset)
    }
}

impl<T: Pod> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from hipMalloc and is freed once; hipFree waits
        // for work still using it. A failure here cannot be reported.
        let _ = unsafe { sys::hipFree(self.ptr.cast()) };
    }
}

/// Page-locked host memory (fast, truly asynchronous transfers).
pub(crate) struct PinnedBuffer<T: Pod> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: owned host memory like a `Vec<T>`; access goes through `&`/`&mut`.
unsafe impl<T: Pod> Send for PinnedBuffer<T> {}
// SAFETY: as above: shared access only reads.
unsafe impl<T: Pod> Sync for PinnedBuffer<T> {}

impl<T: Pod + Default> PinnedBuffer<T> {
    pub(crate) fn new(len: usize) -> Result<Self, HipError> {
        let bytes = len.max(1) * std::mem::size_of::<T>();
        let mut p: *mut c_void = std::ptr::null_mut();
        // SAFETY: `p` is a valid out-pointer; on success it owns `bytes` bytes.
        check("hipHostMalloc", unsafe {
            sys::hipHostMalloc(&mut p, bytes, sys::hipHostMallocDefault)
        })?;
        let ptr: *mut T = p.cast();
        for i in 0..len.max(1) {
            // SAFETY: in bounds of the fresh allocation, suitably aligned
            // (hipHostMalloc returns page-aligned memory); initialises it.
            unsafe { ptr.add(i).write(T::default()) };
        }
        Ok(PinnedBuffer { ptr, len })
    }
}

impl<T: Pod> PinnedBuffer<T> {
    pub(crate) fn as_slice(&self) -> &[T] {
        // SAFETY: `len` initialised elements owned by `self`.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [T] {
        // SAFETY: `len` initialised elements, uniquely borrowed through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Pod> Drop for PinnedBuffer<T> {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from hipHostMalloc and is freed once (HIP
        // synchronises before releasing it).
        let _ = unsafe { sys::hipHostFree(self.ptr.cast()) };
    }
}

/// A non-blocking stream on one device.
pub(crate) struct Stream {
    raw: sys::hipStream_t,
}

// SAFETY: HIP streams may be used from any host thread; commands from
// several threads are serialised by the runtime.
unsafe impl Send for Stream {}
// SAFETY: as above.
unsafe impl Sync for Stream {}

impl Stream {
    pub(crate) fn new() -> Result<Self, HipError> {
        let mut raw: sys::hipStream_t = std::ptr::null_mut();
        // SAFETY: `raw` is a valid out-pointer.
        check("hipStreamCreateWithFlags", unsafe {
            sys::hipStreamCreateWithFlags(&mut raw, sys::hipStreamNonBlocking)
        })?;
        Ok(Stream { raw })
    }

    pub(crate) fn raw(&self) -> sys::hipStream_t {
        self.raw
    }

    /// Queues `dst[..len] = src[..len]` (host to device).
    pub(crate) fn copy_to_device<T: Pod>(
        &self,
        dst: &DeviceBuffer<T>,
        src: &PinnedBuffer<T>,
        len: usize,
    ) -> Result<(), HipError> {
        assert!(len <= dst.len && len <= src.len, "copy of {len} elements out of bounds");
        if len == 0 {
            return Ok(());
        }
        // SAFETY: both ranges are in bounds (asserted); the pinned source is
        // not written by its owner until it waits on this stream (module doc).
        check("hipMemcpyHtoDAsync", unsafe {
            sys::hipMemcpyHtoDAsync(dst.ptr.cast(), src.ptr.cast(), len * std::mem::size_of::<T>(), self.raw)
        })
    }

    /// Queues `dst[..len] = src[..len]` (device to host).
    pub(crate) fn copy_to_host<T: Pod>(
        &self,
        dst: &mut PinnedBuffer<T>,
        src: &DeviceBuffer<T>,
        len: usize,
    ) -> Result<(), HipError> {
        assert!(len <= dst.len && len <= src.len, "copy of {len} elements out of bounds");
        if len == 0 {
            return Ok(());
        }
        // SAFETY: both ranges are in bounds (asserted); the pinned destination
        // is not read by its owner until it waits on this stream (module doc).
        check("hipMemcpyDtoHAsync", unsafe {
            sys::hipMemcpyDtoHAsync(dst.ptr.cast(), src.ptr.cast(), len * std::mem::size_of::<T>(), self.raw)
        })
    }

    /// Waits for everything queued so far.
    pub(crate) fn synchronize(&self) -> Result<(), HipError> {
        // SAFETY: `raw` is a live stream.
        check("hipStreamSynchronize", unsafe { sys::hipStreamSynchronize(self.raw) })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: `raw` came from hipStreamCreateWithFlags and is destroyed
        // once; pending work completes first.
        let _ = unsafe { sys::hipStreamDestroy(self.raw) };
    }
}

/// A completion marker (no timing), recorded on a stream and waited on.
pub(crate) struct Event {
    raw: sys::hipEvent_t,
}

// SAFETY: HIP events may be recorded and waited on from any thread.
unsafe impl Send for Event {}

impl Event {
    pub(crate) fn new() -> Result<Self, HipError> {
        let mut raw: sys::hipEvent_t = std::ptr::null_mut();
        // Blocking sync: a waiting worker sleeps instead of spinning a core.
        let flags = sys::hipEventDisableTiming | sys::hipEventBlockingSync;
        // SAFETY: `raw` is a valid out-pointer.
        check("hipEventCreateWithFlags", unsafe {
            sys::hipEventCreateWithFlags(&mut raw, flags)
        })?;
        Ok(Event { raw })
    }

    pub(crate) fn record(&self, stream: &Stream) -> Result<(), HipError> {
        // SAFETY: both handles are live.
        check("hipEventRecord", unsafe { sys::hipEventRecord(self.raw, stream.raw) })
    }

    pub(crate) fn synchronize(&self) -> Result<(), HipError> {
        // SAFETY: `raw` is a live event.
        check("hipEventSynchronize", unsafe { sys::hipEventSynchronize(self.raw) })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: `raw` came from hipEventCreateWithFlags and is destroyed once.
        let _ = unsafe { sys::hipEventDestroy(self.raw) };
    }
}

/// A code object loaded on the current device.
pub(crate) struct Module {
    raw: sys::hipModule_t,
}

// SAFETY: a loaded module is immutable; HIP allows use from any thread.
unsafe impl Send for Module {}
// SAFETY: as above.
unsafe impl Sync for Module {}

impl Module {
    /// Loads `image` (a code object or a multi-arch offload bundle, which the
    /// runtime searches for the current device's architecture).
    pub(crate) fn load(image: &'static [u8]) -> Result<Self, HipError> {
        let mut raw: sys::hipModule_t = std::ptr::null_mut();
        // SAFETY: `image` is a complete code object embedded in the binary
        // ('static, so it outlives the module); `raw` is a valid out-pointer.
        check("hipModuleLoadData", unsafe {
            sys::hipModuleLoadData(&mut raw, image.as_ptr().cast())
        })?;
        Ok(Module { raw })
    }

    /// The kernel `name` (an `extern "C"` symbol of the code object).
    /// The handle is valid while `self` stays loaded: `launch::Kernels` keeps
    /// both together.
    pub(crate) fn function(&self, name: &'static CStr) -> Result<Function, HipError> {
        let mut raw: sys::hipFunction_t = std::ptr::null_mut();
        // SAFETY: `name` is NUL-terminated and `raw` a valid out-pointer.
        check("hipModuleGetFunction", unsafe {
            sys::hipModuleGetFunction(&mut raw, self.raw, name.as_ptr())
        })?;
        Ok(Function { raw })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        // SAFETY: `raw` came from hipModuleLoadData and is unloaded once.
        let _ = unsafe { sys::hipModuleUnload(self.raw) };
    }
}

/// A kernel of a loaded [`Module`] (valid while the module is).
#[derive(Clone, Copy)]
pub(crate) struct Function {
    pub(crate) raw: sys::hipFunction_t,
}

// SAFETY: an immutable handle into a loaded module, usable from any thread.
unsafe impl Send for Function {}
// SAFETY: as above.
unsafe impl Sync for Function {}
