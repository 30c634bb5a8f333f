//! Routing one row: router linear, softmax (std `f32::exp`), top-k.
//!
//! Owns: the routing arithmetic, written in the same order as the reference
//! forward so the router weights match it bit for bit. Must not touch: the
//! experts' kernels or dispatch.

use crate::model::Linear;

/// Routes row `x`: writes the masked weights `w` (`[E]`, probabilities of the
/// selected experts, others exactly 0, not renormalised) and the selected
/// experts (`[top_k]`, descending probability, ties to the lower index).
/// `p` is `[E]` scratch.
pub(crate) fn route_row(router: &Linear, x: &[f32], p: &mut [f32], w: &mut [f32], selected: &mut [u32]) {
    let k_in = router.in_dim;
    // Each output is the reference's own sequential chain (`acc += w * x`,
    // then `+ bias`); the chains are interleaved (k outer) so they overlap
    // instead of waiting on one add latency at a time.
    p.fill(0.0);
    for (k, &xk) in x.iter().enumerate().take(k_in) {
        for (o, acc) in p.iter_mut().enumerate() {
            *acc += router.weight[o * k_in + k] * xk;
        }
    }
    for (acc, b) in p.iter_mut().zip(&router.bias) {
        *acc += b;
    }
    let max = p.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0f32;
    for v in p.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    for v in p.iter_mut() {
        *v /= sum;
    }
    w.fill(0.0);
    for t in 0..selected.len() {
        // Selection by strict `>` scanning upward: equal probabilities keep
        // the lower index first, like the reference's stable sort.
        let mut best: Option<usize> = None;
        for (e, &pe) in p.iter().enumerate() {
            if selected[..t].contains(&(e as u32)) {
                continue;
            }
            if best.is_none_or(|b| pe > p[b]) {
                best = Some(e);
            }
        }
        let b = best.expect("top_k <= experts");
        selected[t] = b as u32;
        w[b] = p[b];
    }
}
