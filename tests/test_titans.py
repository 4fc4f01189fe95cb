"""Titans against plain token-by-token references: the chunked memory (saturated gates
included) and the MAG / MAL / MAC mixers; and its analytic FLOPs against XLA's count."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import helpers
from tlm_jax import config as config_lib
from tlm_jax import sharding, state, taper
from tlm_jax.model import budget, titans
from tlm_jax.model.layers import rope

jax.config.update("jax_enable_x64", False)


def inputs(length=12, dim=8, hidden=16, depth=2, seed=0):
  keys = jax.random.split(jax.random.key(seed), 8)
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  q = unit(jax.random.normal(keys[0], (length, dim)))
  k = unit(jax.random.normal(keys[1], (length, dim)))
  v = jax.random.normal(keys[2], (length, dim))
  eta = jax.nn.sigmoid(jax.random.normal(keys[3], (length,)) + 1.0)
  theta = 0.3 * jax.nn.sigmoid(jax.random.normal(keys[4], (length,)))
  alpha = 0.2 * jax.nn.sigmoid(jax.random.normal(keys[5], (length,)))
  shapes = (
    [(dim, hidden)] + [(hidden, hidden)] * (depth - 2) + [(hidden, dim)]
    if depth > 1
    else [(dim, dim)]
  )
  weights = [
    0.5 * jax.random.normal(kk, s) / np.sqrt(s[0])
    for kk, s in zip(jax.random.split(keys[6], depth), shapes)
  ]
  return weights, q, k, v, eta, theta, alpha


def reference(weights, q, k, v, eta, theta, alpha, chunk_size):
  """The rule as written, one token at a time; the gradient via jax.grad at the chunk's start."""
  memory = [w for w in weights]
  surprise = [jnp.zeros_like(w) for w in weights]
  loss = lambda ws, kt, vt: jnp.sum((titans.mlp_apply(ws, kt) - vt) ** 2)
  reads = []
  for t in range(q.shape[0]):
    if t % chunk_size == 0:
      anchor = memory
    grads = jax.grad(loss)(anchor, k[t], v[t])
    surprise = [eta[t] * s - theta[t] * g for s, g in zip(surprise, grads)]
    memory = [(1 - alpha[t]) * m + s for m, s in zip(memory, surprise)]
    reads.append(titans.mlp_apply(memory, q[t]))
  return jnp.stack(reads)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_chunk_size_one_equals_the_token_by_token_rule(depth):
  args = inputs(depth=depth)
  np.testing.assert_allclose(
    titans.memory_read(*args, chunk_size=1), reference(*args, 1), atol=1e-5
  )


@pytest.mark.parametrize("chunk_size", [2, 4, 12])
def test_chunked_equals_a_sequential_loop_of_the_chunked_rule(chunk_size):
  args = inputs()
  np.testing.assert_allclose(
    titans.memory_read(*args, chunk_size=chunk_size), reference(*args, chunk_size), atol=1e-5
  )
  assert not np.allclose(reference(*args, chunk_size), reference(*args, 1), atol=1e-4)


def test_reads_are_causal():
  args = list(inputs())
  base = titans.memory_read(*args, chunk_size=4)
  args[2] = args[2].at[7:].set(0.0)  # change keys from token 7 on
  args[3] = args[3].at[7:].add(1.0)
  changed = titans.memory_read(*args, chunk_size=4)
  np.testing.assert_allclose(changed[:7], base[:7], atol=1e-6)
  assert not np.allclose(changed[7:], base[7:], atol=1e-4)


def test_outer_gradients_flow_through_the_inner_updates():
  weights, q, k, v, eta, theta, alpha = inputs()

  def objective(weights, k, v, eta, theta, alpha):
    return jnp.sum(titans.memory_read(weights, q, k, v, eta, theta, alpha, 4) ** 2)

  grads = jax.grad(objective, argnums=(0, 1, 2, 3, 4, 5))(weights, k, v, eta, theta, alpha)
  for g in jax.tree.leaves(grads):
    assert jnp.all(jnp.isfinite(g)) and jnp.abs(g).sum() > 0


# ---------------------------------------------------------------------------
# Saturated gates: the closed form stays finite where float32 sigmoids hit 0 and 1.
# ---------------------------------------------------------------------------

# Gate logits; a float32 sigmoid of +-200, 20, 30 or -120 is exactly 0 or 1.
GATE_LOGITS = {
  "mixed": (
    [200, 200, -200, 0, 20, -30, 200, -200, -200, 30, 0, 200],  # alpha
    [-200, -200, 200, -120, 0, 200, -200, 0, 200, -200, 30, -200],  # eta
  ),
  "forget_all": ([200] * 12, [-200] * 12),
  "keep_all": ([-200] * 12, [200] * 12),
}


def test_saturated_gates_match_the_token_by_token_rule_with_finite_gradients():
  """alpha = 1 and eta = 0 exactly once a float32 sigmoid saturates: log-space decays whose
  running sums were subtracted gave -inf - (-inf) = NaN where the product form is finite."""
  weights, q, k, v, _, theta, _ = inputs()
  alpha_logits, eta_logits = jnp.array(list(GATE_LOGITS.values()), jnp.float32).swapaxes(0, 1)
  assert {0.0, 1.0} <= set(np.asarray(jax.nn.sigmoid(alpha_logits)).ravel().tolist())

  def loss(alpha_logits, eta_logits, read_fn=titans.memory_read):
    eta, alpha = jax.nn.sigmoid(eta_logits), jax.nn.sigmoid(alpha_logits)
    reads = read_fn(weights, q, k, v, eta, theta, alpha, 4)
    return jnp.sum(reads**2), reads

  grad_fn = jax.vmap(jax.grad(loss, argnums=(0, 1), has_aux=True))  # over the cases
  grads, chunked = jax.jit(grad_fn)(alpha_logits, eta_logits)
  assert jnp.all(jnp.isfinite(chunked)) and all(jnp.all(jnp.isfinite(g)) for g in grads)
  want = jax.jit(jax.vmap(lambda a, e: loss(a, e, reference)[1]))(alpha_logits, eta_logits)
  for i, case in enumerate(GATE_LOGITS):
    np.testing.assert_allclose(chunked[i], want[i], atol=1e-5, err_msg=case)


# ---------------------------------------------------------------------------
# Whole mixers (MAG, MAL, MAC) against a token-by-token reference from the same parameters.
# ---------------------------------------------------------------------------


def rms_norm(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def silu(x):
  return x / (1 + np.exp(-x))


def sigmoid(x):
  return 1 / (1 + np.exp(-x))


@jax.jit
def memory_step(anchor, weights, surprise, k_NH, v_NH, eta_N, theta_N, alpha_N, max_norm):
  """S_t = eta S_{t-1} - theta g; M_t = (1 - alpha) M_{t-1} + S_t, per head, with g the
  gradient of l(anchor; k, v) scaled to a norm of at most max_norm. Also: was g scaled?"""
  loss = lambda ws, k, v: jnp.sum((titans.mlp_apply(ws, k) - v) ** 2)
  grads = jax.vmap(jax.grad(loss))(anchor, k_NH, v_NH)
  norm_N = jnp.sqrt(sum(jnp.sum(g**2, axis=(1, 2)) for g in grads))
  scale = jnp.minimum(1.0, max_norm / norm_N)[:, None, None]
  eta, theta, alpha = (g[:, None, None] for g in (eta_N, theta_N, alpha_N))
  surprise = [eta * s - theta * scale * g for s, g in zip(surprise, grads)]
  return [(1 - alpha) * w + s for w, s in zip(weights, surprise)], surprise, jnp.any(scale < 1)


class TokenMemory:
  """A NeuralMemory's parameters run one token at a time, as the rules read (all heads at
  once, numpy but for the gradient): conv over the rows seen so far, SiLU, unit q and k,
  gates, the surprise and forgetting steps with gradients at the chunk's first state, and
  the gated output."""

  def __init__(self, mem, chunk_start=0):
    self.p = {
      k: np.asarray(v)
      for k, v in nnx.to_pure_dict(nnx.state(mem, nnx.Param)).items()
      if k != "memory" and k != "out_norm"
    }
    self.out_scale = np.asarray(mem.out_norm.scale[...])
    self.chunk_size, self.max_inner_lr = mem.chunk_size, mem.max_inner_lr
    self.max_grad_norm, self.capped = mem.max_grad_norm, 0
    self.chunk_start, self.t = chunk_start, 0
    self.weights = [w[...] for w in mem.memory]
    self.surprise = [jnp.zeros_like(w) for w in self.weights]
    self.rows = {"q": [], "k": [], "v": []}

  def project(self, name, x_D, rows):
    rows.append(np.einsum("d,dnh->nh", x_D, self.p[f"w_{name}"]))
    kernel = self.p[f"conv_{name}"]
    z = silu(sum(kernel[j] * rows[-1 - j] for j in range(min(len(kernel), len(rows)))))
    return z if name == "v" else z / np.sqrt(np.sum(z * z, axis=-1, keepdims=True) + 1e-6)

  def gate(self, name, x_D):
    return sigmoid(x_D @ self.p[f"w_{name}"] + self.p[f"b_{name}"])

  def step(self, x_D):
    """Learn from x_t's key and value, then read its query with M_t."""
    q, k, v = (self.project(n, x_D, self.rows[n]) for n in "qkv")
    eta, theta, alpha = (self.gate(n, x_D) for n in ("eta", "theta", "alpha"))
    if self.t == 0 or (self.t - self.chunk_start) % self.chunk_size == 0:
      self.anchor = self.weights
    self.weights, self.surprise, capped = memory_step(
      self.anchor,
      self.weights,
      self.surprise,
      k,
      v,
      eta,
      self.max_inner_lr * theta,
      alpha,
      self.max_grad_norm,
    )
    self.capped += int(capped)
    self.t += 1
    return self.output(self.read(q), x_D)

  def read(self, q_NH):
    h = q_NH
    for i, w in enumerate(self.weights):
      h = np.einsum("ni,nio->no", h, np.asarray(w))
      h = silu(h) if i < len(self.weights) - 1 else h
    return h

  def output(self, y_NH, x_D):
    gate = silu(np.einsum("d,dnh->nh", x_D, self.p["w_gate"]))
    return np.einsum("nh,nhd->d", rms_norm(y_NH, self.out_scale) * gate, self.p["w_o"])


def attention_reference(att, x_TD, context_SD, positions_T, context_positions_S, visible):
  """Softmax attention of each query over the context tokens visible(t, s) says it sees."""
  w = lambda name: np.asarray(getattr(att, name)[...])
  q = np.einsum("td,dnh->tnh", x_TD, w("w_q"))
  k = np.einsum("sd,dkh->skh", context_SD, w("w_k"))
  q, k = (
    np.asarray(rope(a[None], pos[None], att.rope_theta)[0])
    for a, pos in ((q, positions_T), (k, context_positions_S))
  )
  v = np.einsum("sd,dkh->skh", context_SD, w("w_v"))
  heads, kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
  out = np.zeros(q.shape, np.float32)
  for t in range(len(x_TD)):
    seen = [s for s in range(len(context_SD)) if visible(t, s)]
    for n in range(heads):
      g = n // (heads // kv_heads)
      scores = k[seen, g] @ q[t, n] / np.sqrt(head_dim)
      p = np.exp(scores - scores.max())
      out[t, n] = p @ v[seen, g] / p.sum()
  return np.einsum("tnh,nhd->td", out, w("w_o"))


def mixer_reference(mixer, x_TD):
  """One sequence (positions 0..T-1) through the variant as the Titans paper composes it;
  also how many memory steps had a gradient over the cap."""
  x_TD, p_PD = np.asarray(x_TD), np.asarray(mixer.persistent[...])
  length, window, prefix = len(x_TD), mixer.window, len(p_PD)
  positions = np.arange(length)
  norms = (
    [np.asarray(n.scale[...]) for n in (mixer.attention_norm, mixer.memory_norm)]
    if mixer.variant != "mal"
    else []
  )
  combine = lambda y, m: rms_norm(y, norms[0]) * sigmoid(rms_norm(m, norms[1]))
  if mixer.variant in ("mag", "mal"):
    stream = np.concatenate([p_PD, x_TD])  # [persistent | x], the memory starting at p
    stream_positions = np.arange(-prefix, length)
    memory = TokenMemory(mixer.memory, chunk_start=prefix)  # x starts a chunk
    m = np.stack([memory.step(x_D) for x_D in stream])
    visible = lambda t, s: s < prefix or 0 <= t - (s - prefix) < window
    if mixer.variant == "mal":  # attention over the memory's outputs only
      y = attention_reference(mixer.attention, m[prefix:], m, positions, stream_positions, visible)
      return y, memory.capped
    y = attention_reference(mixer.attention, x_TD, stream, positions, stream_positions, visible)
    return combine(y, m[prefix:]), memory.capped
  size, memory, x_rows, outs = mixer.segment_size, TokenMemory(mixer.memory), [], []
  for start in range(0, length, size):
    seg, seg_positions = x_TD[start : start + size], positions[start : start + size]
    h = np.stack([memory.output(memory.read(memory.project("q", x, x_rows)), x) for x in seg])
    context = np.concatenate([p_PD, h, seg])  # [persistent | retrieved | segment]
    context_positions = np.concatenate(
      [np.arange(start - prefix, start), seg_positions, seg_positions]
    )
    visible = lambda t, s: s < prefix or (s - prefix) % size <= t
    y = attention_reference(
      mixer.attention, seg, context, seg_positions, context_positions, visible
    )
    outs.append(combine(y, np.stack([memory.step(y_D) for y_D in y])))
  return np.concatenate(outs), memory.capped


def random_mixer(persistent_tokens=2, **titans_fields):
  """A tiny Titans mixer (chunks of 4, segments of 8, window 4) with random params, norm
  scales around 1, so that every part shows; and its graphdef, params."""
  cfg = helpers.load_config("tlm_titans", "tiny")
  cfg.model.update(persistent_tokens=persistent_tokens, attention_window=4)
  plain = dict(chunk_size=4, segment_size=8, max_inner_lr=0.5, max_grad_norm=0.2, remat_chunks=0)
  cfg.model.titans.update(plain, **titans_fields)
  spec = config_lib.model_spec(cfg)
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: titans.Titans(spec, rngs=nnx.Rngs(0))))
  rng = np.random.default_rng(0)

  def fill(x):
    z = rng.standard_normal(x.shape, np.float32)
    return jnp.asarray(1 + 0.2 * z if len(x.shape) == 1 else 0.15 * z)

  params = jax.tree.map(fill, abstract)
  return nnx.merge(graphdef, params), graphdef, params


@pytest.mark.parametrize("variant", ["mag", "mal", "mac"])
def test_mixer_matches_the_token_by_token_reference(variant):
  mixer, graphdef, params = random_mixer(variant=variant)
  x_BTD = np.random.default_rng(0).standard_normal((2, 16, mixer.attention.w_q.shape[0]))
  x_BTD = x_BTD.astype(np.float32)
  positions_BT = jnp.broadcast_to(jnp.arange(16), (2, 16))
  got = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x, positions_BT))(params, x_BTD)
  for b in range(2):
    want, capped = mixer_reference(mixer, x_BTD[b])
    np.testing.assert_allclose(got[b], want, atol=1e-4, rtol=1e-4)
    assert capped  # the cap acts on some tokens here


# ---------------------------------------------------------------------------
# Rematerialised memory scans (model.titans.remat_chunks) against the plain scan.
# ---------------------------------------------------------------------------


# mag / mal: 2 persistent + 2 neutral + 18 tokens + 2 padding = 6 chunks in groups of 4;
# mac: segments of 12 = 3 chunks in groups of 2. Either way the last group is partial. One
# memory layer: the regrouping does not depend on the depth, and it compiles a fifth faster.
@pytest.mark.parametrize(
  "variant, remat_chunks, segment_size", [("mag", 4, 8), ("mal", 4, 8), ("mac", 2, 12)]
)
def test_rematerialised_scan_gives_the_plain_loss_and_gradients(
  variant, remat_chunks, segment_size
):
  fields = dict(variant=variant, segment_size=segment_size, memory_depth=1)
  plain, graphdef, params = random_mixer(**fields)
  remat = random_mixer(**fields, remat_chunks=remat_chunks)[1]
  rng = np.random.default_rng(1)
  x_BTD = jnp.asarray(rng.standard_normal((2, 18, plain.attention.w_q.shape[0])), jnp.float32)
  probe_BTD = jnp.asarray(rng.standard_normal(x_BTD.shape), jnp.float32)
  positions_BT = jnp.broadcast_to(jnp.arange(18), (2, 18))

  def loss(params, graphdef):
    return jnp.sum(nnx.merge(graphdef, params)(x_BTD, positions_BT) * probe_BTD)

  assert "remat" in str(jax.make_jaxpr(loss, static_argnums=1)(params, remat))
  both = jax.jit(lambda p: [jax.value_and_grad(loss)(p, g) for g in (graphdef, remat)])
  (want, want_grads), (got, got_grads) = both(params)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for (path, g), w in zip(jax.tree.leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
    assert np.abs(w).max() > 0, path
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5 * np.abs(w).max(), err_msg=str(path))


# ---------------------------------------------------------------------------
# Decoding in pieces of any length, from any position, equals __call__.
# ---------------------------------------------------------------------------

# Chunks of 4, segments of 8: pieces of 1, C - 1, C, C + 1, 2, S + 3 and 2 tokens that start
# at a segment's start (0, 8), at a chunk's start inside a segment (4) and between (1, 13, 15,
# 26), and end at a segment's end (8), a chunk's end (4, 28) or between; the piece from 13
# ends inside a segment's last chunk, so the window after it starts the next segment unused.
PIECES = (1, 3, 4, 5, 2, 11, 2)


@pytest.mark.parametrize("variant, persistent_tokens", [("mag", 0), ("mal", 2), ("mac", 3)])
def test_decode_in_pieces_equals_call_at_every_position(variant, persistent_tokens):
  mixer, graphdef, params = random_mixer(persistent_tokens, variant=variant)
  length = sum(PIECES)
  rng = np.random.default_rng(2)
  x_BTD = jnp.asarray(rng.standard_normal((2, length, mixer.attention.w_q.shape[0])), jnp.float32)
  positions_BT = jnp.broadcast_to(jnp.arange(length), (2, length))

  @jax.jit  # one program for all the pieces: one compile
  def decode_and_call(params):
    mixer = nnx.merge(graphdef, params)
    cache, start, pieces = mixer.init_cache(2, length), 0, []
    for size in PIECES:
      window = slice(start, start + size)
      y_BTD, cache = mixer.decode(x_BTD[:, window], positions_BT[:, window], cache)
      pieces.append(y_BTD)
      start += size
    return jnp.concatenate(pieces, axis=1), mixer(x_BTD, positions_BT)

  decoded, want = decode_and_call(params)
  np.testing.assert_allclose(decoded, want, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# Analytic FLOPs against XLA's count of the train step.
# ---------------------------------------------------------------------------


def xla_flops_per_token(cfg) -> float:
  """XLA's cost analysis of the train step on one device, per token.

  The lowered module, before XLA's optimisation passes: the same HloCostAnalysis as on the
  compiled one (within ~1% here), without the minutes a CPU takes to compile six unrolled
  Titans steps. XLA counts a while loop's body once, so layers run unrolled and the chunk
  and segment scans are unrolled (model.titans.unroll).
  """
  run = state.setup(cfg, sharding.make_mesh(cfg.mesh, jax.devices()[:1]))
  tokens = jax.ShapeDtypeStruct(
    (cfg.train.batch_size, cfg.train.seq_len), jnp.int32, sharding=run.batch_sharding
  )
  lowered = run.train_step.lower(run.abstract_state, dict(inputs=tokens, targets=tokens))
  return lowered.cost_analysis()["flops"] / (cfg.train.batch_size * cfg.train.seq_len)


@pytest.mark.parametrize("variant", ["mag", "mal", "mac"])
def test_analytic_flops_match_xla_and_the_taper_keeps_them(variant):
  """costs.py counts matmuls (and the convs) and, by the MFU convention, only the keys a
  query's mask lets through; XLA also counts elementwise work (norms, activations, softmax,
  the inner loop's decays, AdamW) and the masked-out scores, together ~8% at this width."""
  cfg = helpers.load_config("tlm_titans", "tiny")
  cfg.model.update(layers_mode="unrolled", num_layers=2)  # two widths: 384 and 128
  # chunk_size 16; no remat: XLA would count the backward pass's recompute again
  cfg.model.titans.update(variant=variant, unroll=True, segment_size=32, remat_chunks=0)
  cfg.mesh.update(data=1, fsdp=1, tensor=1)
  cfg.train.update(batch_size=16, seq_len=32)
  spec = config_lib.model_spec(cfg)
  residual, widths = taper.plan(spec)
  analytic = budget.flops_per_token(spec, widths, residual, cfg.train.seq_len)
  tapered, uniform = xla_flops_per_token(cfg), xla_flops_per_token(taper.uniform_twin(cfg))
  assert abs(analytic / tapered - 1) < 0.10, (analytic, tapered)
  assert abs(tapered / uniform - 1) < 0.01, (tapered, uniform)
