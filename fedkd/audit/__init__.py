"""`fedkd-audit`: what an honest-but-curious server learns about one client's data.

The server sees exactly what fedkd sends it: a weight-sharing client's uploaded
model, or a soft-label client's coded logits on the public proxy set (float16,
int8, one bit). The audit asks, for candidate examples of which half are in the
target client's shard, "was this one trained on?", with two attacks:

- threshold (Yeom et al. 2018): the server model's logit-scaled confidence on the
  true label; members tend to score higher.
- LiRA, online (Carlini et al. 2022): shadow clients trained like the target, each
  on a random half of the candidates, give per-example score distributions with
  and without the example; the target's score is judged by their likelihood ratio.

For soft-label uploads the server has no model of the client; it distills a
surrogate student from the upload (the attack of Shi et al., PoPETs 2025, on
FedMD and DS-FL) and scores the candidates with it.

`attacks.py` holds the scoring maths, `metrics.py` ROC AUC and TPR at low FPR with
bootstrap intervals (scikit-learn), `run.py` the federated glue.
"""
