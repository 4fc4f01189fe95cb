"""lm-evaluation-harness on tlm_jax checkpoints: the harness model `tlm_jax`.

    pip install -e .[eval]        # lm-eval (no torch needed)
    python -m tlm_jax.lm_eval_adapter --model tlm_jax --model_args workdir=W \
        --tasks hellaswag,lambada_openai [--include_path MY_TASKS ...]   # lm_eval's own flags

or from Python:

    import lm_eval
    from tlm_jax.lm_eval_adapter import TlmJaxLM
    lm_eval.simple_evaluate(model=TlmJaxLM(workdir=W), tasks=[...])

lm-eval 0.4 finds models in its own registry and has no plugin hook, so the
plain `lm_eval` command does not know `tlm_jax`: importing this module
registers it, and `python -m tlm_jax.lm_eval_adapter` (also installed as
`tlm-lm-eval`) does that and then runs lm_eval's command line unchanged.

The three request types use tlm_jax's own scoring and decoding, so the numbers
equal `python -m tlm_jax.evaluate --tasks`: loglikelihood is
`tasks.Scorer.loglikelihood` on `tasks.encode_pair` (requests start with the
separator, as training documents do), loglikelihood_rolling uses
`tasks.rolling_windows` (model_args `stride`, default seq_len: the harness's
disjoint windows), generate_until is `generate.generate` (greedy unless
do_sample, contexts cut on the left to seq_len - max_gen_toks).
model_args: workdir (required), batch_size, stride, max_gen_toks (default 256).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from tlm_jax import generate, restore, tasks
from tlm_jax.errors import ConfigError


@register_model("tlm_jax")
class TlmJaxLM(LM):
  """A workdir's latest checkpoint as an lm-eval model."""

  def __init__(
    self,
    workdir: str,
    batch_size: int | str = 16,
    stride: int = 0,
    max_gen_toks: int = 256,
    **unused: Any,  # device, max_batch_size: the harness passes them to every model
  ):
    super().__init__()
    del unused
    restored = restore.latest(workdir)
    self.workdir, self.step = workdir, restored.step
    self.tokenizer, self.model = restored.tokenizer, restored.model
    self.seq_len = restored.config.train.seq_len
    self.batch_size = 16 if str(batch_size).startswith("auto") else int(batch_size)
    self.stride, self.max_gen_toks = int(stride), int(max_gen_toks)
    self.scorer = tasks.Scorer(self.model, self.seq_len, self.batch_size)

  def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list:
    pairs = [tasks.encode_pair(self.tokenizer, *r.args) for r in requests]
    results = self.scorer.loglikelihood(pairs)
    for request, result in zip(requests, results):
      self.cache_hook.add_partial("loglikelihood", request.args, result)
    return results

  def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list:
    windows, owners = [], []
    for i, request in enumerate(requests):
      ids = [int(t) for t in self.tokenizer.encode(request.args[0])]
      stride = self.stride or self.seq_len
      for window in tasks.rolling_windows(ids, self.tokenizer.eos_id, self.seq_len, stride):
        windows.append(window)
        owners.append(i)
    totals = [0.0] * len(requests)
    for owner, (logp, _) in zip(owners, self.scorer.windows(windows)):
      totals[owner] += logp
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
    return totals

  def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
    """Requests with the same generation settings run together, batch_size at a time."""
    groups: dict[str, list[int]] = {}
    for i, request in enumerate(requests):
      groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
    outputs: list[str] = [""] * len(requests)
    for indices in groups.values():
      kwargs = dict(requests[indices[0]].args[1])
      until = kwargs.pop("until", None) or []
      until = [until] if isinstance(until, str) else list(until)
      sampling = dict(temperature=0.0)
      if kwargs.get("do_sample"):
        sampling = dict(
          temperature=float(kwargs.get("temperature", 1.0)),
          top_k=int(kwargs.get("top_k") or 0),
          top_p=float(kwargs.get("top_p") or 1.0),
        )
      for start in range(0, len(indices), self.batch_size):
        batch = indices[start : start + self.batch_size]
        texts = generate.generate(
          self.model,
          self.tokenizer,
          [requests[i].args[0] for i in batch],
          max_new_tokens=int(kwargs.get("max_gen_toks", self.max_gen_toks)),
          stop=until,
          max_len=self.seq_len,
          **sampling,
        )
        for i, text in zip(batch, texts):
          outputs[i] = text
          self.cache_hook.add_partial("generate_until", requests[i].args, text)
    return outputs


def main() -> None:
  """lm_eval's command line with `tlm_jax` registered; bad input as one `error:` line."""
  from lm_eval.__main__ import cli_evaluate

  try:
    cli_evaluate()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)


if __name__ == "__main__":
  main()
