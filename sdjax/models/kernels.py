"""Memory-efficient attention kernels and how a model picks one.

`attend(q, k, v, scale, implementation, factors)` computes softmax(q k^T * scale) v per
head on `[B, T, H, d]` tensors with one of:

- "xla":    `jax.nn.dot_product_attention`'s XLA path: the `[B, H, T, S]` scores are
            materialised (float32 softmax). Every backend; CPU's choice.
- "cudnn":  cuDNN's fused flash attention (GPU; bfloat16 operands, float32 softmax
            statistics inside the kernel).
- "splash": the Pallas splash-attention kernel (TPU; interpreted on CPU for tests).
            Sequences are zero-padded to multiples of 128 (its block size): padded keys
            are masked inside the kernel, padded queries are cut from the output, so the
            adapter's visual + object tokens (4096 + N) run in it too. Fewer than 128
            keys (the 77 text tokens) use XLA: their scores are no larger than the
            activations, and padding would waste 40% of the kernel's work.

"auto" is resolved by the platform the model is compiled for (`resolve`): TPU splash,
GPU cuDNN, CPU XLA. That platform is JAX's backend, or the one `compiling_for` names
while tracing for chips that are not here (`sdjax plan`: on a CPU host compiling for a
TPU topology, splash must lower to its Mosaic kernel, not be interpreted).

A mask reaches the kernels in factored form: `factors = (blocked [B, T, R], groups
[B, S, R])`, both in {0, 1}: query t must not see key s when some r has blocked[t, r] =
groups[s, r] = 1 (region-bound attention: r is a subject; `sdjax.models.regions`). XLA
gets it as a boolean mask; a fused kernel gets it as R extra head dimensions, q' = [q,
-C blocked / scale], k' = [k, groups], so that a masked logit is lowered by C (2^20)
and its probability is exactly 0, without any mask tensor in memory.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
_MASKED = 2.0**20  # logit penalty of a masked pair in the factored form (exact in bf16)
_LANES = 128  # TPU vector width: splash's sequence blocks are multiples of it
_TARGET = contextvars.ContextVar("sdjax_target_platform", default=None)


@contextlib.contextmanager
def compiling_for(platform: str):
    """Trace for `platform` ("tpu", "gpu", "cpu") instead of JAX's default backend."""
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


def target_platform() -> str:
    """The platform being compiled for: `compiling_for`'s, else JAX's default backend."""
    return _TARGET.get() or jax.default_backend()


def resolve(implementation: str | None, platform: str | None = None) -> str:
    """A concrete implementation: "auto" (or None) by `platform` (default: JAX's backend)."""
    if implementation not in (None, "auto"):
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"attention {implementation!r}; known: {IMPLEMENTATIONS}")
        return implementation
    platform = platform or target_platform()
    return {"tpu": "splash", "gpu": "cudnn", "cuda": "cudnn"}.get(platform, "xla")


def factored_mask(blocked, groups):
    """bool `[B, 1, T, S]`: True where query t may see key s."""
    return (jnp.einsum("btr,bsr->bts", blocked, groups) < 0.5)[:, None]


def attend(q, k, v, *, scale: float, implementation: str, factors=None, is_causal=False):
    """Attention on `[B, T, H, d]` queries and `[B, S, H, d]` keys/values -> `[B, T, H, d]`."""
    implementation = resolve(implementation)
    if implementation == "splash" and not is_causal and k.shape[1] >= _LANES:
        return _splash(q, k, v, scale, factors)
    if implementation == "cudnn" and not is_causal:
        return _cudnn(q, k, v, scale, factors)
    mask = None if factors is None else factored_mask(*factors)
    return jax.nn.dot_product_attention(
        q, k, v, scale=scale, mask=mask, is_causal=is_causal, implementation="xla"
    )


def augment(q, k, scale: float, factors, multiple: int = 1):
    """q, k `[B, T|S, H, d]` with the factored mask as extra head dimensions (module doc),
    zero-padded to a multiple of `multiple`."""
    blocked, groups = (jax.lax.stop_gradient(f) for f in factors)
    extra = blocked.shape[-1]
    pad = -(q.shape[-1] + extra) % multiple

    def widen(x, cols):
        cols = jnp.broadcast_to(cols[:, :, None, :], (*x.shape[:3], extra)).astype(x.dtype)
        zeros = jnp.zeros((*x.shape[:3], pad), x.dtype)
        return jnp.concatenate([x, cols, zeros], axis=-1)

    return widen(q, -_MASKED / scale * blocked), widen(k, groups)


def _cudnn(q, k, v, scale, factors):
    """cuDNN's flash attention; its q, k and v share one head width, so with a mask v is
    zero-padded to the augmented width and the output cut back."""
    dtype, d = q.dtype, v.shape[-1]
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    if factors is not None:
        q, k = augment(q, k, scale, factors, multiple=8)
        v = jnp.pad(v, ((0, 0), (0, 0), (0, 0), (0, q.shape[-1] - d)))
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation="cudnn")
    return out[..., :d].astype(dtype)


def _splash(q, k, v, scale, factors):
    """Splash attention on sequences padded to multiples of 128, vmapped over the batch
    and, inside a mesh, run per shard."""
    t, s = q.shape[1], k.shape[1]
    q = q * jnp.asarray(scale, q.dtype)  # splash takes pre-scaled queries
    if factors is not None:
        q, k = augment(q, k, 1.0, factors, multiple=_LANES)

    def padded(x):  # [B, L, H, d] -> [B, H, L', d], L' a multiple of 128
        x = jnp.pad(x, ((0, 0), (0, -x.shape[1] % _LANES), (0, 0), (0, 0)))
        return jnp.swapaxes(x, 1, 2)

    q, k, v = padded(q), padded(k), padded(v)
    kernel = _splash_kernel(q.shape[1], q.shape[2], k.shape[2], s, target_platform() != "tpu")
    run = jax.vmap(kernel)
    axes = _batch_axes(q.shape[0])
    if axes:  # a custom call: each device runs it on its share of the batch
        from jax.sharding import PartitionSpec as P

        spec = P(axes, None, None, None)
        mesh = jax.sharding.get_abstract_mesh()
        run = jax.shard_map(run, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)
    return jnp.swapaxes(run(q, k, v), 1, 2)[:, :t]


def _batch_axes(batch: int):
    """The mesh axes the logical 'batch' axis maps to in the current mesh and rules, when
    they split `batch` evenly; else None (no mesh, or e.g. a batch of 1 at init)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return None
    from flax import linen as nn

    axes = nn.logical_to_mesh_axes(("batch",))[0]
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    ways = 1
    for name in names:
        ways *= mesh.shape[name]
    return axes if names and batch % ways == 0 else None


def _splash_kernel(heads: int, t: int, s: int, keys: int, interpret: bool):
    """A splash kernel for `[heads, t, s]` attention where only the first `keys` of the s
    keys are real (the rest padding, masked in the kernel). Made while tracing: its mask
    tables become constants of the computation, not arrays on a device."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    bq, bkv = _block(t), _block(s)
    sizes = sk.BlockSizes(
        block_q=bq,
        block_kv=bkv,
        block_kv_compute=bkv,
        block_q_dkv=bq,
        block_kv_dkv=bkv,
        block_kv_dkv_compute=bkv,
        block_q_dq=bq,
        block_kv_dq=bkv,
    )
    mask = sm.FullMask((t, s)) if keys == s else _first_keys(sm, (t, s), keys)
    mask = sm.MultiHeadMask([mask] * heads)
    return sk.make_splash_mha(
        mask, head_shards=1, q_seq_shards=1, block_sizes=sizes, interpret=interpret
    )


def _first_keys(sm, shape: tuple[int, int], keys: int):
    """A splash mask computed in the kernel: every query sees keys 0..keys-1."""

    class FirstKeys(sm._ComputableMask):
        def __init__(self):
            super().__init__(shape, lambda q_ids, kv_ids: kv_ids < keys)

        def __eq__(self, other):
            return isinstance(other, FirstKeys) and other.shape == self.shape

        def __hash__(self):
            return hash((FirstKeys, shape, keys))

    return FirstKeys()


def _block(length: int) -> int:
    """The largest of 512, 256, 128 that divides `length` (a multiple of 128)."""
    return next(b for b in (512, 256, _LANES) if length % b == 0)
