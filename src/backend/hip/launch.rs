//! Typed launches of the kernels in kernels/*.hip.
//!
//! Owns: the modules of one device, each kernel's argument list (types and
//! order must match the `extern "C"` signature in its .hip file) and its grid
//! and block shape. Must not touch: buffer ownership (`runtime`) or the
//! forward's plan (`device`).
//!
//! Every wrapper checks that the buffers it is given are large enough for
//! the launch, so the kernels' index arithmetic stays in bounds; the only
//! remaining contract is the argument layout, written once per kernel here.

use std::ffi::{CStr, c_void};

use super::ffi::{HipError, check, sys};
use super::kernels::MODULES;
use super::runtime::{DeviceBuffer, Function, Module, Stream};

// Shapes fixed by the kernels (see the #defines in each .hip file).
const GEMM_TILE: u32 = 64;
const GEMM_THREADS: u32 = 256;
const LN_THREADS: u32 = 256;
const ROUTER_THREADS: u32 = 128;
const DISPATCH_THREADS: u32 = 256;
const GATHER_THREADS: u32 = 128;
const COMBINE_THREADS: u32 = 256;
/// `TK_ROUTER_MAX_EXPERTS` in router.hip.
pub(crate) const MAX_EXPERTS: usize = 16;

/// The kernels of one device. Functions are valid while `_modules` is loaded,
/// and both live and die together here.
pub(crate) struct Kernels {
    gemm_bias: Function,
    layernorm_gelu: Function,
    router_topk: Function,
    dispatch: Function,
    gather_rows: Function,
    combine: Function,
    _modules: Vec<Module>,
}

fn find(modules: &[Module], name: &'static CStr) -> Result<Function, HipError> {
    let want = name.to_str().expect("ASCII kernel name");
    let idx = MODULES
        .iter()
        .position(|(_, _, k)| k.contains(&want))
        .expect("kernel listed in MODULES");
    modules[idx].function(name)
}

/// Grid size in blocks of `per` covering `n` (at least 1).
fn blocks(n: usize, per: u32) -> Result<u32, HipError> {
    u32::try_from(n.div_ceil(per as usize).max(1)).map_err(|_| HipError {
        call: "hipModuleLaunchKernel",
        code: sys::hipError_t::hipErrorInvalidValue as u32,
        name: "grid too large".into(),
        message: format!("{n} items need more than 2^32 blocks"),
    })
}

fn dim(v: usize) -> i32 {
    i32::try_from(v).expect("dimension fits i32 (checked when the backend is built)")
}

/// Argument slot: a pointer to one argument value, as hipModuleLaunchKernel wants.
fn arg<T>(v: &mut T) -> *mut c_void {
    (v as *mut T).cast()
}

impl Kernels {
    /// Loads every code object on the current device.
    pub(crate) fn load() -> Result<Kernels, HipError> {
        let modules = MODULES
            .iter()
            .map(|(_, image, _)| Module::load(image))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Kernels {
            gemm_bias: find(&modules, c"tk_gemm_bias")?,
            layernorm_gelu: find(&modules, c"tk_layernorm_gelu")?,
            router_topk: find(&modules, c"tk_router_topk")?,
            dispatch: find(&modules, c"tk_dispatch")?,
            gather_rows: find(&modules, c"tk_gather_rows")?,
            combine: find(&modules, c"tk_combine")?,
            _modules: modules,
        })
    }

    /// # Safety
    /// `args` must match `f`'s parameter list exactly (count, types, order)
    /// and every pointer argument must be valid for the grid's accesses.
    unsafe fn launch(
        &self,
        f: Function,
        stream: &Stream,
        grid: (u32, u32),
        block: u32,
        args: &mut [*mut c_void],
    ) -> Result<(), HipError> {
        // SAFETY: forwarded to the caller's contract; `args` outlives the call
        // (HIP copies the argument values at launch).
        check("hipModuleLaunchKernel", unsafe {
            sys::hipModuleLaunchKernel(
                f.raw,
                grid.0,
                grid.1,
                1,
                block,
                1,
                1,
                0,
                stream.raw(),
                args.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }

    /// `c[row, :n] = a[row, :k] W^T + bias` for the first `*m_ptr` rows
    /// (`m_max` bounds the grid). `m_ptr` is element `m_idx` of `counts`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gemm_bias(
        &self,
        stream: &Stream,
        a: (&DeviceBuffer<f32>, usize),
        w: &DeviceBuffer<f32>,
        bias: &DeviceBuffer<f32>,
        c: (&DeviceBuffer<f32>, usize),
        counts: (&DeviceBuffer<i32>, usize),
        m_max: usize,
        n: usize,
        k: usize,
    ) -> Result<(), HipError> {
        assert!(w.len() >= n * k && bias.len() >= n, "gemm weights smaller than {n}x{k}");
        assert!(
            a.1 + m_max * k <= a.0.len() && c.1 + m_max * n <= c.0.len(),
            "gemm activations too small"
        );
        assert!(counts.1 < counts.0.len());
        let (mut pa, mut pw, mut pb, mut pc, mut pm) = (
            a.0.ptr_at(a.1),
            w.ptr_at(0),
            bias.ptr_at(0),
            c.0.ptr_at(c.1),
            counts.0.ptr_at(counts.1),
        );
        let (mut nn, mut kk) = (dim(n), dim(k));
        let mut args = [
            arg(&mut pa),
            arg(&mut pw),
            arg(&mut pb),
            arg(&mut pc),
            arg(&mut pm),
            arg(&mut nn),
            arg(&mut kk),
        ];
        let grid = (blocks(n, GEMM_TILE)?, blocks(m_max, GEMM_TILE)?);
        // SAFETY: matches `tk_gemm_bias(const float*, const float*, const
        // float*, float*, const int*, int, int)`; the kernel reads/writes at
        // most `*m_ptr <= m_max` rows (the dispatch kernel's count never
        // exceeds the batch), bounds asserted above.
        unsafe { self.launch(self.gemm_bias, stream, grid, GEMM_THREADS, &mut args) }
    }

    /// In place on the first `*m_ptr` rows of `act` (`[m_max, n]`); gamma and
    /// beta `None` in identity mode.
    pub(crate) fn layernorm_gelu(
        &self,
        stream: &Stream,
        act: &DeviceBuffer<f32>,
        counts: (&DeviceBuffer<i32>, usize),
        m_max: usize,
        n: usize,
        affine: Option<(&DeviceBuffer<f32>, &DeviceBuffer<f32>)>,
    ) -> Result<(), HipError> {
        assert!(act.len() >= m_max * n && counts.1 < counts.0.len());
        if let Some((g, b)) = affine {
            assert!(g.len() >= n && b.len() >= n);
        }
        let (mut pa, mut pm) = (act.ptr_at(0), counts.0.ptr_at(counts.1));
        let mut nn = dim(n);
        let (mut pg, mut pb) = match affine {
            Some((g, b)) => (g.ptr_at(0), b.ptr_at(0)),
            None => (std::ptr::null_mut(), std::ptr::null_mut()),
        };
        let mut args = [arg(&mut pa), arg(&mut pm), arg(&mut nn), arg(&mut pg), arg(&mut pb)];
        let grid = (blocks(m_max, 1)?, 1);
        // SAFETY: matches `tk_layernorm_gelu(float*, const int*, int, const
        // float*, const float*)`; one block per row below `*m_ptr <= m_max`.
        unsafe { self.launch(self.layernorm_gelu, stream, grid, LN_THREADS, &mut args) }
    }

    /// Router + softmax + top-k over `n` rows of `x` (`[n, k_in]`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn router_topk(
        &self,
        stream: &Stream,
        x: &DeviceBuffer<f32>,
        w: &DeviceBuffer<f32>,
        bias: &DeviceBuffer<f32>,
        n: usize,
        k_in: usize,
        experts: usize,
        top_k: usize,
        weights: &DeviceBuffer<f32>,
        selected: &DeviceBuffer<u32>,
    ) -> Result<(), HipError> {
        assert!(experts <= MAX_EXPERTS && top_k <= experts);
        assert!(x.len() >= n * k_in && w.len() >= experts * k_in && bias.len() >= experts);
        assert!(weights.len() >= n * experts && selected.len() >= n * top_k);
        let (mut px, mut pw, mut pb) = (x.ptr_at(0), w.ptr_at(0), bias.ptr_at(0));
        let mut probs: *mut f32 = std::ptr::null_mut();
        let (mut pwt, mut psel) = (weights.ptr_at(0), selected.ptr_at(0));
        let (mut nn, mut kk, mut ee, mut tk) = (dim(n), dim(k_in), dim(experts), dim(top_k));
        let mut args = [
            arg(&mut px),
            arg(&mut pw),
            arg(&mut pb),
            arg(&mut nn),
            arg(&mut kk),
            arg(&mut ee),
            arg(&mut tk),
            arg(&mut probs),
            arg(&mut pwt),
            arg(&mut psel),
        ];
        let grid = (blocks(n, ROUTER_THREADS)?, 1);
        // SAFETY: matches `tk_router_topk(const float*, const float*, const
        // float*, int, int, int, int, float*, float*, unsigned*)`; probs may be
        // null; sizes asserted above.
        unsafe { self.launch(self.router_topk, stream, grid, ROUTER_THREADS, &mut args) }
    }

    /// Each expert's ascending row list (`rows[e * cap ..]`), counts, and
    /// every row's position in its experts' lists (`pos[row * E + e]`).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn dispatch(
        &self,
        stream: &Stream,
        selected: &DeviceBuffer<u32>,
        n: usize,
        experts: usize,
        top_k: usize,
        cap: usize,
        counts: &DeviceBuffer<i32>,
        rows: &DeviceBuffer<i32>,
        pos: &DeviceBuffer<i32>,
    ) -> Result<(), HipError> {
        assert!(n <= cap && selected.len() >= n * top_k && counts.len() >= experts);
        assert!(rows.len() >= experts * cap && pos.len() >= n * experts);
        let mut ps = selected.ptr_at(0);
        let (mut pc, mut pr, mut pp) = (counts.ptr_at(0), rows.ptr_at(0), pos.ptr_at(0));
        let (mut nn, mut ee, mut tk, mut cc) = (dim(n), dim(experts), dim(top_k), dim(cap));
        let mut args = [
            arg(&mut ps),
            arg(&mut nn),
            arg(&mut ee),
            arg(&mut tk),
            arg(&mut cc),
            arg(&mut pc),
            arg(&mut pr),
            arg(&mut pp),
        ];
        let grid = (u32::try_from(experts).expect("few experts"), 1);
        // SAFETY: matches `tk_dispatch(const unsigned*, int, int, int, int,
        // int*, int*, int*)`; sizes asserted above.
        unsafe { self.launch(self.dispatch, stream, grid, DISPATCH_THREADS, &mut args) }
    }

    /// `dst[i, :] = x[rows[e * cap + i], :]` for `i < counts[e]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn gather_rows(
        &self,
        stream: &Stream,
        x: &DeviceBuffer<f32>,
        rows: &DeviceBuffer<i32>,
        counts: &DeviceBuffer<i32>,
        e: usize,
        n: usize,
        cap: usize,
        k: usize,
        dst: &DeviceBuffer<f32>,
    ) -> Result<(), HipError> {
        assert!(x.len() >= n * k && rows.len() >= (e + 1) * cap && e < counts.len() && dst.len() >= n * k);
        let (mut px, mut pr, mut pc, mut pd) = (x.ptr_at(0), rows.ptr_at(0), counts.ptr_at(0), dst.ptr_at(0));
        let (mut ee, mut cc, mut kk) = (dim(e), dim(cap), dim(k));
        let mut args = [
            arg(&mut px),
            arg(&mut pr),
            arg(&mut pc),
            arg(&mut ee),
            arg(&mut cc),
            arg(&mut kk),
            arg(&mut pd),
        ];
        let grid = (blocks(n, 1)?, 1);
        // SAFETY: matches `tk_gather_rows(const float*, const int*, const
        // int*, int, int, int, float*)`; counts[e] <= n rows, each < n.
        unsafe { self.launch(self.gather_rows, stream, grid, GATHER_THREADS, &mut args) }
    }

    /// `logits[row, :] = sum over its experts, ascending, of w * y_e[pos, :]`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn combine(
        &self,
        stream: &Stream,
        y: &DeviceBuffer<f32>,
        weights: &DeviceBuffer<f32>,
        pos: &DeviceBuffer<i32>,
        n: usize,
        experts: usize,
        out: usize,
        cap: usize,
        logits: &DeviceBuffer<f32>,
    ) -> Result<(), HipError> {
        assert!(y.len() >= experts * cap * out && weights.len() >= n * experts && pos.len() >= n * experts);
        assert!(logits.len() >= n * out && n <= cap);
        let (mut py, mut pw, mut pp, mut pl) = (y.ptr_at(0), weights.ptr_at(0), pos.ptr_at(0), logits.ptr_at(0));
        let (mut nn, mut ee, mut oo, mut cc) = (dim(n), dim(experts), dim(out), dim(cap));
        let mut args = [
            arg(&mut py),
            arg(&mut pw),
            arg(&mut pp),
            arg(&mut nn),
            arg(&mut ee),
            arg(&mut oo),
            arg(&mut cc),
            arg(&mut pl),
        ];
        let grid = (blocks(n * out, COMBINE_THREADS)?, 1);
        // SAFETY: matches `tk_combine(const float*, const float*, const int*,
        // int, int, int, int, float*)`; sizes asserted above.
        unsafe { self.launch(self.combine, stream, grid, COMBINE_THREADS, &mut args) }
    }
}
