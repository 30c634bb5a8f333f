//! [`HipBackend`]: the model on one or more GPUs, and its sessions.
//!
//! Owns: the per-GPU weight copies (uploaded once, in the checkpoint's own
//! `[out, in]` layout), the stream pool, session scratch, and the forward's
//! launch plan. Must not touch: raw HIP calls (`runtime`, `launch`) — this
//! file has no `unsafe`.
//!
//! Sessions are spread round-robin over GPUs, then over each GPU's
//! `streams_per_gpu` streams; two sessions on one stream just queue behind
//! each other (each waits on its own event). Each session has its own device
//! scratch and pinned staging, so sessions never share mutable memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::HipOptions;
use super::ffi::HipError;
use super::kernels::ARCHS;
use super::launch::{Kernels, MAX_EXPERTS};
use super::runtime::{self, DeviceBuffer, Event, PinnedBuffer, Stream};
use crate::backend::{Backend, BackendError, ForwardOutput, PoolShape, Session, SessionConfig};
use crate::model::{Dims, LayerNormMode, Linear, MoeWeights};

/// Most rows one pass of the forward handles; larger batches run in chunks
/// (rows are independent, so chunking never changes a result) and scratch
/// stays bounded (two `[chunk, H]` activations).
const MAX_CHUNK_ROWS: usize = 4096;

struct DeviceLinear {
    w: DeviceBuffer<f32>,
    b: DeviceBuffer<f32>,
    n: usize,
    k: usize,
}

impl DeviceLinear {
    fn upload(l: &Linear) -> Result<Self, HipError> {
        Ok(DeviceLinear {
            w: DeviceBuffer::from_slice(&l.weight)?,
            b: DeviceBuffer::from_slice(&l.bias)?,
            n: l.out_dim,
            k: l.in_dim,
        })
    }
}

struct DeviceBlock {
    linear: DeviceLinear,
    /// gamma, beta in stored mode; `None` in identity mode (never uploaded).
    affine: Option<(DeviceBuffer<f32>, DeviceBuffer<f32>)>,
}

struct DeviceExpert {
    blocks: Vec<DeviceBlock>,
    output: DeviceLinear,
}

/// One GPU: its kernels, its copy of the weights, its streams.
struct Gpu {
    id: i32,
    label: String,
    streams: Vec<Arc<Stream>>,
    router: DeviceLinear,
    experts: Vec<DeviceExpert>,
    kernels: Kernels,
}

impl Gpu {
    fn new(id: i32, weights: &MoeWeights, mode: LayerNormMode, streams: usize) -> Result<Gpu, HipError> {
        runtime::set_device(id)?;
        let (name, bytes) = runtime::device_info(id)?;
        let kernels = Kernels::load()?;
        let router = DeviceLinear::upload(&weights.router)?;
        let experts = weights
            .experts
            .iter()
            .map(|e| {
                let blocks = e
                    .blocks
                    .iter()
                    .map(|b| {
                        let affine = match mode {
                            LayerNormMode::Identity => None,
                            LayerNormMode::Stored => Some((
                                DeviceBuffer::from_slice(&b.norm.gamma)?,
                                DeviceBuffer::from_slice(&b.norm.beta)?,
                            )),
                        };
                        Ok(DeviceBlock {
                            linear: DeviceLinear::upload(&b.linear)?,
                            affine,
                        })
                    })
                    .collect::<Result<Vec<_>, HipError>>()?;
                Ok(DeviceExpert {
                    blocks,
                    output: DeviceLinear::upload(&e.output)?,
                })
            })
            .collect::<Result<Vec<_>, HipError>>()?;
        let streams = (0..streams)
            .map(|_| Stream::new().map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let label = format!("{id}: {name} ({} GiB)", bytes >> 30);
        Ok(Gpu {
            id,
            label,
            streams,
            router,
            experts,
            kernels,
        })
    }
}

/// The HIP backend. Built once; sessions share its per-GPU weights.
pub struct HipBackend {
    dims: Dims,
    mode: LayerNormMode,
    gpus: Vec<Arc<Gpu>>,
    streams_per_gpu: usize,
    next_session: AtomicUsize,
}

impl HipBackend {
    /// Uploads `weights` to every selected GPU (all visible ones when
    /// `options.gpus` is empty). Fails with the reason when no device is
    /// usable, a listed id does not exist, or any HIP call fails.
    pub fn new(weights: &MoeWeights, mode: LayerNormMode, options: &HipOptions) -> Result<HipBackend, BackendError> {
        let dims = weights.dims;
        if dims.experts > MAX_EXPERTS || dims.top_k > dims.experts {
            return Err(BackendError::Unavailable(format!(
                "hip backend supports up to {MAX_EXPERTS} experts with top_k <= experts (model: {} experts, top_k {})",
                dims.experts, dims.top_k
            )));
        }
        let count =
            runtime::device_count().map_err(|e| BackendError::Unavailable(format!("no HIP device found ({e})")))?;
        if count == 0 {
            return Err(BackendError::Unavailable(
                "no HIP device found (hipGetDeviceCount returned 0)".into(),
            ));
        }
        let ids: Vec<u32> = if options.gpus.is_empty() {
            (0..count as u32).collect()
        } else {
            options.gpus.clone()
        };
        if let Some(bad) = ids.iter().find(|&&g| g as usize >= count) {
            return Err(BackendError::Unavailable(format!(
                "setting `workers.gpus`: device {bad} does not exist ({count} HIP device(s) visible: 0..{})",
                count - 1
            )));
        }
        let streams = options.streams_per_gpu.max(1);
        let gpus = ids
            .iter()
            .map(|&g| {
                Gpu::new(g as i32, weights, mode, streams)
                    .map(Arc::new)
                    .map_err(|e| BackendError::Device(format!("GPU {g} (code objects built for {ARCHS}): {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HipBackend {
            dims,
            mode,
            gpus,
            streams_per_gpu: streams,
            next_session: AtomicUsize::new(0),
        })
    }

    pub fn layer_norm_mode(&self) -> LayerNormMode {
        self.mode
    }

    /// Device ids in use.
    pub fn devices(&self) -> Vec<i32> {
        self.gpus.iter().map(|g| g.id).collect()
    }
}

impl Backend for HipBackend {
    fn name(&self) -> &'static str {
        "hip"
    }

    fn describe(&self) -> String {
        let labels: Vec<&str> = self.gpus.iter().map(|g| g.label.as_str()).collect();
        format!(
            "hip [{}], {} stream(s)/GPU, f32",
            labels.join("; "),
            self.streams_per_gpu
        )
    }

    fn dims(&self) -> Dims {
        self.dims
    }

    fn device_memory_used(&self) -> Vec<(String, u64)> {
        self.gpus
            .iter()
            .filter_map(|g| runtime::memory_used(g.id).ok().map(|bytes| (g.id.to_string(), bytes)))
            .collect()
    }

    /// One worker per stream of every GPU in use.
    fn pool_shape(&self, _cores: usize) -> PoolShape {
        PoolShape {
            workers: self.gpus.len() * self.streams_per_gpu,
            threads_per_worker: 1,
        }
    }

    fn create_session(&self, _config: SessionConfig) -> Result<Box<dyn Session>, BackendError> {
        let k = self.next_session.fetch_add(1, Ordering::Relaxed);
        let gpu = Arc::clone(&self.gpus[k % self.gpus.len()]);
        let stream = Arc::clone(&gpu.streams[(k / self.gpus.len()) % gpu.streams.len()]);
        runtime::set_device(gpu.id)?;
        let done = Event::new()?;
        Ok(Box::new(HipSession {
            dims: self.dims,
            gpu,
            stream,
            done,
            scratch: None,
        }))
    }
}

/// One session's device scratch and pinned staging, for up to `cap` rows.
struct Scratch {
    cap: usize,
    x: DeviceBuffer<f32>,
    weights: DeviceBuffer<f32>,
    selected: DeviceBuffer<u32>,
    counts: DeviceBuffer<i32>,
    rows: DeviceBuffer<i32>,
    pos: DeviceBuffer<i32>,
    gathered: DeviceBuffer<f32>,
    act: [DeviceBuffer<f32>; 2],
    y: DeviceBuffer<f32>,
    logits: DeviceBuffer<f32>,
    host_x: PinnedBuffer<f32>,
    host_logits: PinnedBuffer<f32>,
    host_weights: PinnedBuffer<f32>,
    host_selected: PinnedBuffer<u32>,
}

impl Scratch {
    fn new(d: &Dims, cap: usize) -> Result<Scratch, HipError> {
        Ok(Scratch {
            cap,
            x: DeviceBuffer::new(cap * d.input)?,
            weights: DeviceBuffer::new(cap * d.experts)?,
            selected: DeviceBuffer::new(cap * d.top_k)?,
            counts: DeviceBuffer::new(d.experts)?,
            rows: DeviceBuffer::new(d.experts * cap)?,
            pos: DeviceBuffer::new(cap * d.experts)?,
            gathered: DeviceBuffer::new(cap * d.input)?,
            act: [DeviceBuffer::new(cap * d.hidden)?, DeviceBuffer::new(cap * d.hidden)?],
            y: DeviceBuffer::new(d.experts * cap * d.output)?,
            logits: DeviceBuffer::new(cap * d.output)?,
            host_x: PinnedBuffer::new(cap * d.input)?,
            host_logits: PinnedBuffer::new(cap * d.output)?,
            host_weights: PinnedBuffer::new(cap * d.experts)?,
            host_selected: PinnedBuffer::new(cap * d.top_k)?,
        })
    }
}

struct HipSession {
    dims: Dims,
    gpu: Arc<Gpu>,
    stream: Arc<Stream>,
    done: Event,
    scratch: Option<Scratch>,
}

impl HipSession {
    /// Scratch for at least `n` rows, grown (to a power of two) when needed.
    fn scratch(&mut self, n: usize) -> Result<&mut Scratch, HipError> {
        if self.scratch.as_ref().is_none_or(|s| s.cap < n) {
            self.scratch = None; // release before allocating the larger one
            let cap = n.next_power_of_two().clamp(16, MAX_CHUNK_ROWS);
            self.scratch = Some(Scratch::new(&self.dims, cap)?);
        }
        Ok(self.scratch.as_mut().expect("just ensured"))
    }

    /// The forward over `input` (`n <= MAX_CHUNK_ROWS` rows) into the output slices.
    fn chunk(&mut self, input: &[f32], logits: &mut [f32], rw: &mut [f32], topk: &mut [u32]) -> Result<(), HipError> {
        let d = self.dims;
        let n = input.len() / d.input;
        let gpu = Arc::clone(&self.gpu);
        let stream = Arc::clone(&self.stream);
        let s = self.scratch(n)?;
        let (kn, cap) = (&gpu.kernels, s.cap);
        s.host_x.as_mut_slice()[..input.len()].copy_from_slice(input);
        stream.copy_to_device(&s.x, &s.host_x, input.len())?;
        let r = &gpu.router;
        kn.router_topk(
            &stream,
            &s.x,
            &r.w,
            &r.b,
            n,
            d.input,
            d.experts,
            d.top_k,
            &s.weights,
            &s.selected,
        )?;
        kn.dispatch(
            &stream,
            &s.selected,
            n,
            d.experts,
            d.top_k,
            cap,
            &s.counts,
            &s.rows,
            &s.pos,
        )?;
        for (e, expert) in gpu.experts.iter().enumerate() {
            kn.gather_rows(&stream, &s.x, &s.rows, &s.counts, e, n, cap, d.input, &s.gathered)?;
            let mut src = &s.gathered;
            for (l, block) in expert.blocks.iter().enumerate() {
                let dst = &s.act[l % 2];
                let lin = &block.linear;
                kn.gemm_bias(
                    &stream,
                    (src, 0),
                    &lin.w,
                    &lin.b,
                    (dst, 0),
                    (&s.counts, e),
                    n,
                    lin.n,
                    lin.k,
                )?;
                let affine = block.affine.as_ref().map(|(g, b)| (g, b));
                kn.layernorm_gelu(&stream, dst, (&s.counts, e), n, lin.n, affine)?;
                src = dst;
            }
            let o = &expert.output;
            kn.gemm_bias(
                &stream,
                (src, 0),
                &o.w,
                &o.b,
                (&s.y, e * cap * d.output),
                (&s.counts, e),
                n,
                o.n,
                o.k,
            )?;
        }
        kn.combine(
            &stream, &s.y, &s.weights, &s.pos, n, d.experts, d.output, cap, &s.logits,
        )?;
        stream.copy_to_host(&mut s.host_logits, &s.logits, n * d.output)?;
        stream.copy_to_host(&mut s.host_weights, &s.weights, n * d.experts)?;
        stream.copy_to_host(&mut s.host_selected, &s.selected, n * d.top_k)?;
        self.done.record(&stream)?;
        self.done.synchronize()?;
        let s = self.scratch.as_ref().expect("allocated above");
        logits.copy_from_slice(&s.host_logits.as_slice()[..logits.len()]);
        rw.copy_from_slice(&s.host_weights.as_slice()[..rw.len()]);
        topk.copy_from_slice(&s.host_selected.as_slice()[..topk.len()]);
        Ok(())
    }
}

impl Session for HipSession {
    fn forward(&mut self, input: &[f32], out: &mut ForwardOutput) -> Result<(), BackendError> {
        let d = self.dims;
        let n = out.prepare(&d, input)?;
        if n == 0 {
            return Ok(());
        }
        // Worker threads are not the thread that built the backend, and
        // HIP's current device is per thread.
        runtime::set_device(self.gpu.id)?;
        let chunks = input
            .chunks(MAX_CHUNK_ROWS * d.input)
            .zip(out.logits.chunks_mut(MAX_CHUNK_ROWS * d.output))
            .zip(out.router_weights.chunks_mut(MAX_CHUNK_ROWS * d.experts))
            .zip(out.top_k.chunks_mut(MAX_CHUNK_ROWS * d.top_k));
        for (((x, logits), rw), topk) in chunks {
            if let Err(e) = self.chunk(x, logits, rw, topk) {
                // Leave nothing in flight on buffers this session may reuse.
                let _ = self.stream.synchronize();
                return Err(e.into());
            }
        }
        Ok(())
    }
}
