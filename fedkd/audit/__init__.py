"""`fedkd-audit`: what an honest-but-curious server learns about one client's data,
and the epsilon an audit that could fail refutes.

The server sees exactly what fedkd sends it: a weight-sharing client's uploaded
model, or a soft-label client's coded logits on the public proxy set (float16,
int8, one bit). For soft-label uploads it distills a surrogate student from them
(the attack of Shi et al., PoPETs 2025, on FedMD and DS-FL).

- attacks: for candidates of which half are in the target's shard, a threshold on
  the logit-scaled confidence (Yeom et al. 2018) and online LiRA (Carlini et al.
  2022) with shadow clients trained as the target trains.
- black-box bound: input canaries in those shadows, scored in the server's view,
  calibrated by reference shadows, through the one-run test (Steinke, Nasr and
  Jagielski 2023).
- white-box bound (privacy=sample): the client's DP-SGD replayed with Dirac gradient
  canaries (Nasr et al. 2023), every noisy step observed, checked against the
  accountant's epsilon for the same steps.

Every bound comes with its attainable maximum (all guesses right): a check whose
ceiling is below the epsilon it checks cannot fail. Modules: `attacks.py` (scores),
`metrics.py` (ROC, the one-run test), `client.py` (training as the client trains),
`shadows.py`, `canaries.py`, `run.py` (the glue). docs/audit.md has the numbers.
"""
