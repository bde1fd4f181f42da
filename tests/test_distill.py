"""method distill, on-policy distillation: the student samples, a frozen teacher (another model with the student's
tokenizer) scores each sampled token, and each token's advantage is -(log pi_student - log pi_teacher).
Two processes: test_distributed."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import read_metrics, write_recipe

from prefopt import recipe as recipe_lib
from prefopt.cli import train_recipe
from prefopt.errors import PrefoptError, RecipeError
from prefopt.losses import ppo as ppo_math
from prefopt.trainers import PPOTrainer


@pytest.fixture(scope="module")
def teacher(sort_task, tmp_path_factory):
    """A wider model with the student's tokenizer, other weights."""
    from transformers import AutoTokenizer

    from prefopt.data.synthetic import build_tiny_model

    tokenizer = AutoTokenizer.from_pretrained(sort_task / "model")
    return build_tiny_model(tokenizer, tmp_path_factory.mktemp("teacher"), hidden_size=96, seed=7)


def distill_sections(teacher, **distill):
    return dict(method="distill", data={"eval": None}, distill={"teacher": str(teacher), **distill},
                rollout={"samples_per_prompt": 2, "max_new_tokens": 8},
                train={"batch_size": 8, "micro_batch_size": 4, "max_steps": 3, "log_every": 1})


def test_each_tokens_advantage_is_the_teachers_log_prob_minus_the_students(sort_task, tmp_path, teacher):
    """The first rollout's advantages against the two models' log-probs of the sampled tokens, computed apart:
    log softmax of each model's logits at the sampled token (temperature 1)."""
    from transformers import AutoModelForCausalLM

    recipe = recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                                          **distill_sections(teacher)))
    assert (recipe.ppo.advantage, recipe.ppo.gamma, recipe.ppo.kl_penalty, recipe.reference.kind) == (
        "reinforce_pp", 0.0, "reward", "copy")
    trainer = PPOTrainer(recipe)
    try:
        rollout, _ = trainer.make_rollout(0)  # the first rollout
    finally:
        trainer.close()
    student = AutoModelForCausalLM.from_pretrained(sort_task / "model").eval()
    expert = AutoModelForCausalLM.from_pretrained(teacher).eval()
    width = rollout.mask.shape[1]
    ids, attention = rollout.input_ids, rollout.attention_mask
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        logps = [torch.log_softmax(m(input_ids=ids, attention_mask=attention, position_ids=position_ids)
                                   .logits[:, -width - 1 : -1].float(), -1).gather(2, ids[:, -width:, None])[..., 0]
                 for m in (student, expert)]
    expected = -(logps[0] - logps[1]) * rollout.mask
    assert torch.allclose(rollout.advantages, expected, atol=1e-5)
    assert rollout.stats["rollout/kl"] == pytest.approx(((logps[0] - logps[1]) * rollout.mask).sum(1).mean().item(),
                                                        abs=1e-5)


def test_the_gradient_of_a_three_token_completion_by_hand():
    """At ratio 1 (the update's first pass) the token-mean clipped objective is -mean_t(A_t ratio_t), so its
    gradient in log pi_t is -A_t / 3 for each of the 3 tokens, with A_t = log pi_teacher - log pi_student."""
    student = torch.tensor([[-1.0, -0.5, -2.0]], requires_grad=True)
    teacher = torch.tensor([[-1.5, -0.2, -2.5]])
    mask = torch.ones(1, 3)
    advantages = -(student.detach() - teacher)  # [-0.5, 0.3, -0.5]
    loss = ppo_math.policy_loss(student, student.detach(), advantages, mask, clip_low=0.2, clip_high=0.2,
                                aggregation="token_mean")
    loss.backward()
    assert torch.allclose(student.grad, torch.tensor([[0.5, -0.3, 0.5]]) / 3)
    assert loss.item() == pytest.approx(-(-0.5 + 0.3 - 0.5) / 3)


def test_the_sampled_token_estimate_is_trls_reverse_kl_in_expectation():
    """E over tokens drawn from the student of log pi_s - log pi_t (each token's advantage, negated) is the
    reverse KL(pi_s || pi_t) that TRL's generalized JSD gives at beta 1 (GKDTrainer.generalized_jsd_loss),
    exactly, on every position: the expectation taken over the whole vocabulary."""
    from trl.experimental.gkd import GKDTrainer

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    log_s, log_t = torch.log_softmax(student, -1), torch.log_softmax(teacher, -1)
    expected = (log_s.exp() * (log_s - log_t)).sum(-1)  # E_{v ~ pi_s}[k1(v)] per position
    trl = GKDTrainer.generalized_jsd_loss(student, teacher, beta=1.0, reduction="none").sum(-1)
    assert torch.allclose(expected, trl, atol=1e-6)
    assert F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1).allclose(expected, atol=1e-6)


def test_distillation_lowers_the_kl_to_the_teacher(sort_task, tmp_path, teacher):
    """A few updates move the student towards the teacher: the held-out KL(student || teacher) (k3, per
    completion) falls; a LoRA student trains too."""
    sections = distill_sections(teacher)
    sections["data"] = {"eval": str(sort_task / "eval.jsonl")}
    sections["rollout"] = {**sections["rollout"], "samples_per_prompt": 4}
    sections["train"] = {"batch_size": 16, "micro_batch_size": 16, "max_steps": 30, "eval_every": 30}
    sections["optim"] = {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0}
    from prefopt.cli import train_recipe

    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))
    evals = read_metrics(tmp_path / "run", "eval")
    assert evals[-1]["kl"] < evals[0]["kl"], [e["kl"] for e in evals]
    train = read_metrics(tmp_path / "run")
    assert all(math.isfinite(r["loss"]) for r in train) and "rewards/" not in "".join(train[0])
    lora = {**sections, "model": {"lora": {"r": 4, "alpha": 8}}, "train": {**sections["train"], "max_steps": 2,
                                                                          "eval_every": 0}, "data": {"eval": None}}
    train_recipe(write_recipe(tmp_path / "l.yaml", sort_task, tmp_path / "lora", **lora))
    assert (tmp_path / "lora" / "final" / "adapter_config.json").exists()


def test_a_teacher_with_another_tokenizer_is_refused_before_training(sort_task, tmp_path):
    from prefopt.data.synthetic import write_arithmetic_task

    other = write_arithmetic_task(tmp_path / "other", n_train=4, n_eval=2)
    recipe = recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                                          **distill_sections(other / "model")))
    with pytest.raises(RecipeError, match="distill.teacher: the tokenizer of .* is not the student's"):
        PPOTrainer(recipe)


def test_distill_recipe_errors(sort_task, tmp_path, teacher):
    with pytest.raises(RecipeError, match="distill.teacher: give the teacher's checkpoint"):
        recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                                     **{**distill_sections(teacher), "distill": {}}))
    for distill, message in (({"coef": 0}, "distill.coef: must be a finite number > 0"),
                             ({"beta": 1.5}, r"distill.beta: interpolates forward \(0\) and reverse \(1\) KL"),
                             ({"top_k": 0}, "distill.top_k: must be >= 1"),
                             ({"loss": "kl"}, "distill.loss: 'kl' is not one of")):
        with pytest.raises(RecipeError, match=message):
            recipe_lib.load(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run",
                                         **distill_sections(teacher, **distill)))


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_generalized_jsd_equals_trls(beta):
    """prefopt's GKD divergence per position against TRL 1.16's GKDTrainer.generalized_jsd_loss on the same logits
    (temperature 0.7): beta 0 the forward KL, 1 the reverse, between them the generalised JSD."""
    from trl.experimental.gkd import GKDTrainer

    from prefopt.losses.distill import generalized_jsd

    torch.manual_seed(1)
    student, teacher = torch.randn(3, 4, 13), torch.randn(3, 4, 13)
    ours = generalized_jsd(student, teacher, beta, temperature=0.7)
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, beta=beta, temperature=0.7, reduction="none").sum(-1)
    assert torch.allclose(ours, theirs, atol=1e-6)
    assert torch.allclose(generalized_jsd(student, teacher, beta, 0.7, top_k=13), ours, atol=1e-6)  # k = V


def test_top_k_and_the_reverse_kls_gradient_by_hand():
    """top_k 2 keeps the teacher's two likeliest tokens, both distributions renormalised there; the gradient of
    the reverse KL in the student's logits is p_s (log p_s - log p_t - KL), computed by hand."""
    from prefopt.losses.distill import generalized_jsd

    student, teacher = torch.tensor([[0.0, 1.0, 2.0, -1.0]]), torch.tensor([[3.0, 0.0, 2.0, 1.0]])
    kept = [0, 2]  # the teacher's two likeliest
    p_s, p_t = torch.softmax(student[0, kept], 0), torch.softmax(teacher[0, kept], 0)
    expected = (p_s * (p_s.log() - p_t.log())).sum()
    assert generalized_jsd(student, teacher, 1.0, top_k=2)[0].item() == pytest.approx(expected.item(), abs=1e-6)
    logits = student.clone().requires_grad_(True)
    generalized_jsd(logits, teacher, 1.0)[0].backward()
    log_s, log_t = torch.log_softmax(student[0], 0), torch.log_softmax(teacher[0], 0)
    kl = (log_s.exp() * (log_s - log_t)).sum()
    assert torch.allclose(logits.grad[0], log_s.exp() * (log_s - log_t - kl), atol=1e-6)


def test_jsd_distillation_trains_on_whole_distributions(sort_task, tmp_path, teacher):
    from prefopt.cli import train_recipe

    sections = distill_sections(teacher, loss="jsd", beta=0.5, top_k=50)
    sections["data"] = {"eval": str(sort_task / "eval.jsonl")}
    sections["rollout"] = {**sections["rollout"], "samples_per_prompt": 4}
    sections["train"] = {"batch_size": 16, "micro_batch_size": 8, "max_steps": 30, "eval_every": 30}
    sections["optim"] = {"lr": 1e-3, "schedule": "constant", "warmup_steps": 0}
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))
    train, evals = read_metrics(tmp_path / "run"), read_metrics(tmp_path / "run", "eval")
    assert train[-1]["distill/jsd"] < train[0]["distill/jsd"] and train[0]["loss"] == pytest.approx(
        train[0]["distill/jsd"], abs=1e-6)
    assert evals[-1]["kl"] < evals[0]["kl"]


def test_gkds_lambda_mixes_in_the_data_sets_completions(sort_task, tmp_path, teacher):
    """distill.lmbda 0.5: each rollout is the student's samples or, drawn from (seed, rollout), the data set's own
    completions of the same prompts (TRL GKD's lmbda: the student generates when u < lmbda). A data rollout's
    completions are the rows' `completion`s; both kinds occur in 8 rollouts, and the run trains on both."""
    import json

    sections = distill_sections(teacher, loss="jsd", lmbda=0.5)
    sections["data"] = {"train": str(sort_task / "sft.jsonl"), "eval": None}
    sections["rollout"] = {"samples_per_prompt": 1, "max_new_tokens": 16}
    sections["train"] = {**sections["train"], "max_steps": 8}
    sections["eval"] = {"generate": 8}
    train_recipe(write_recipe(tmp_path / "r.yaml", sort_task, tmp_path / "run", **sections))
    records = read_metrics(tmp_path / "run")
    on_policy = [r["distill/on_policy"] for r in records]
    assert set(on_policy) == {0.0, 1.0} and all(math.isfinite(r["distill/jsd"]) for r in records)
    completions = {row["prompt"]: row["completion"] for row in map(json.loads, (sort_task / "sft.jsonl").open())}
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").open()]
    for step, policy in enumerate(on_policy, 1):
        drawn = [s for s in samples if s.get("step") == step]
        assert drawn, step
        matches = [s["completion"].strip() == completions[s["prompt"]].strip() for s in drawn]
        assert all(matches) if not policy else not any(matches), (step, drawn[:2])


def test_gkds_lambda_takes_the_jsd_and_a_completion_column(sort_task, tmp_path, teacher):
    with pytest.raises(RecipeError, match="use distill.loss: jsd"):
        recipe_lib.load(write_recipe(tmp_path / "a.yaml", sort_task, tmp_path / "a",
                                     **distill_sections(teacher, lmbda=0.5)))
    with pytest.raises(PrefoptError, match="have no `completion` column"):
        train_recipe(write_recipe(tmp_path / "b.yaml", sort_task, tmp_path / "b",
                                  **distill_sections(teacher, loss="jsd", lmbda=0.5)))


def test_a_teacher_on_an_engine_server_scores_as_the_one_beside_the_student(sort_task, tmp_path, teacher):
    """distill.server: spawn: the teacher in `prefopt serve TEACHER` answers the log-probs of the sampled tokens;
    the run's records equal the run with the teacher beside the student (the same reverse KL, so the same
    update). jsd with a served teacher is refused."""
    from conftest import assert_same_records

    sections = distill_sections(teacher)
    sections["data"] = {"eval": str(sort_task / "eval.jsonl")}
    sections["train"] = {**sections["train"], "eval_every": 3}
    local, served = tmp_path / "local", tmp_path / "served"
    train_recipe(write_recipe(tmp_path / "a.yaml", sort_task, local, **sections))
    sections["distill"] = {**sections["distill"], "server": "spawn"}
    train_recipe(write_recipe(tmp_path / "b.yaml", sort_task, served, **sections))
    for split in ("train", "eval"):
        assert_same_records(read_metrics(local, split), read_metrics(served, split), tolerance=1e-5)
    with pytest.raises(RecipeError, match="use distill.loss: reverse_kl with a served teacher"):
        recipe_lib.load(write_recipe(tmp_path / "c.yaml", sort_task, tmp_path / "c",
                                     **distill_sections(teacher, loss="jsd", server="spawn")))


def permuted_teacher(teacher, out):
    """The teacher under another numbering of the same tokens: its tokenizer's ordinary tokens renumbered in
    reverse (special tokens kept), its embedding and output rows moved with them. The same model."""
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(teacher)
    state = json.loads(tokenizer.backend_tokenizer.to_str())
    special = {t["id"] for t in state["added_tokens"]}
    ordinary = sorted(i for i in state["model"]["vocab"].values() if i not in special)
    new_id = dict(zip(ordinary, reversed(ordinary)))
    state["model"]["vocab"] = {token: new_id.get(i, i) for token, i in state["model"]["vocab"].items()}
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    renumbered = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(state)),
                                         eos_token=tokenizer.eos_token, pad_token=tokenizer.pad_token)
    renumbered.save_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(teacher)
    order = torch.arange(model.config.vocab_size)
    for old, new in new_id.items():
        order[new] = old
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight[order])
        if not model.config.tie_word_embeddings:
            model.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight[order])
    model.save_pretrained(out)
    return out


def test_a_teacher_with_the_students_tokens_under_other_ids_maps_by_text(sort_task, tmp_path, teacher):
    """distill.token_map: by_text: the teacher renumbered (the same model under another numbering of the same
    tokens) gives the run of the teacher itself (records 1e-5); without the map it is refused, naming the map."""
    from conftest import assert_same_records

    renumbered = permuted_teacher(teacher, tmp_path / "renumbered")
    sections = distill_sections(teacher)
    sections["data"] = {"eval": str(sort_task / "eval.jsonl")}
    sections["train"] = {**sections["train"], "eval_every": 3}
    train_recipe(write_recipe(tmp_path / "a.yaml", sort_task, tmp_path / "a", **sections))
    sections["distill"] = {"teacher": str(renumbered), "token_map": "by_text"}
    train_recipe(write_recipe(tmp_path / "b.yaml", sort_task, tmp_path / "b", **sections))
    for split in ("train", "eval"):
        assert_same_records(read_metrics(tmp_path / "a", split), read_metrics(tmp_path / "b", split), 1e-5)
    del sections["distill"]["token_map"]
    with pytest.raises(RecipeError, match="distill.token_map: by_text"):
        train_recipe(write_recipe(tmp_path / "c.yaml", sort_task, tmp_path / "c", **sections))
