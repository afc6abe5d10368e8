"""The shared-prompt forward inside TRL 1.16 (sami_kernels.integrations.trl) against TRL's own fused forward.

A stock trainer and a SharedPrompt* trainer, built from deep copies of one tiny random Llama (float32, sdpa), get the
same batch: the loss, every metric the trainer logs and every parameter gradient agree to 1e-5. GRPO runs its own
_prepare_inputs (generation fixed by a rollout_func, rewards, advantages, old and reference log-probs, the shuffle)
with ragged left-padded prompts and G = 3 completions each; DPO its own data collator. The forward alone is compared
field by field with TRL's on rows that share prompts out of order, label holes and a row without labels. Refusals
name the option."""

import copy
from types import SimpleNamespace

import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, ProcessorMixin
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from sami_kernels.engine.models import tiny_random_path
from sami_kernels.integrations import trl as shared

PROMPTS = (
    "How do I keep basil fresh after buying it?",
    "What is a quick way to warm up before a run?",
    "Why is the sky blue?",
)
G = 3  # completions per prompt
PAIRS = (  # prompt, chosen, rejected: ragged lengths
    ("How do I keep basil fresh?", " Stand it in a glass of water.", " Basil is a herb."),
    ("What is a quick warm up before a run?", " Walk briskly, then do leg swings and strides.", " Running."),
    ("Explain rain.", " Water vapour condenses into drops that fall.", " It is wet and it comes down a lot."),
    ("How long should I boil an egg?", " About six minutes.", " Eggs come from hens and ducks."),
)
pytestmark = pytest.mark.filterwarnings("ignore:You are using 'rollout_func':UserWarning")  # TRL's own notice
COMMON = {"report_to": [], "use_cpu": True, "bf16": False, "gradient_checkpointing": False, "seed": 0}


@pytest.fixture(scope="module")
def tiny():
    """(model, tokenizer): the tiny random Llama, its weights moved off the checkpoint so that the reference TRL
    loads from the checkpoint differs from the policy."""
    path = tiny_random_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=generator))
    return model, AutoTokenizer.from_pretrained(path)


def with_lora(model):
    """The model with a LoRA adapter whose B is random (not zero), so that the adapter changes the log-probs."""
    return get_peft_model(
        copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )


class GroupSpy:
    """Records the group sizes of every group_logprobs call the shared forward makes."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = shared.group_logprobs

        def spy(model, prompts, completions, **options):
            self.calls.append([len(group) for group in completions])
            return real(model, prompts, completions, **options)

        monkeypatch.setattr(shared, "group_logprobs", spy)


def assert_grads_match(ours, stock):
    theirs = dict(stock.named_parameters())
    named = [(n, p, theirs[n]) for n, p in ours.named_parameters() if p.requires_grad]
    assert named and len(theirs) == len(dict(ours.named_parameters()))
    for name, p, q in named:
        assert p.grad is not None and q.grad is not None, name
        assert (p.grad - q.grad).abs().max().item() <= 1e-5 * q.grad.abs().max().item() + 1e-8, name


def assert_metrics_match(ours, stock):
    assert ours.keys() == stock.keys()
    for name, values in stock.items():
        torch.testing.assert_close(
            torch.tensor(ours[name]), torch.tensor(values), rtol=1e-5, atol=1e-5, equal_nan=True, msg=name
        )


# ---------------------------------------------------------------------------------------------------- GRPO


def completion_length(completions, **kwargs):
    return [float(len(c)) for c in completions]


def fixed_rollout(prompts, trainer):
    """Generation replaced by fixed completions of 1-8 random tokens, every second one ending in EOS."""
    tokenizer = trainer.processing_class
    generator = torch.Generator().manual_seed(1)
    completions = []
    for r in range(len(prompts)):
        ids = torch.randint(3, len(tokenizer), (int(torch.randint(1, 9, (1,), generator=generator)),))
        completions.append(ids.tolist() + [tokenizer.eos_token_id] * (r % 2))
    return {"prompt_ids": [tokenizer(p)["input_ids"] for p in prompts], "completion_ids": completions, "logprobs": None}


def grpo_step(trainer_class, model, tokenizer, tmp_path, **config):
    """(trainer, inputs, loss): TRL's _prepare_inputs on the fixed rollouts, old log-probs nudged so that the clip
    ratios are not trivially 0, then compute_loss and backward."""
    args = GRPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=len(PROMPTS) * G,
        num_generations=G,
        max_completion_length=9,
        num_iterations=2,  # TRL then computes old log-probs through the forward
        temperature=0.8,  # divides the logits of every log-prob (generation is fixed)
        **COMMON,
        **config,
    )
    trainer = trainer_class(
        model=model,
        reward_funcs=completion_length,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": list(PROMPTS)}),
        processing_class=tokenizer,
        rollout_func=fixed_rollout,
    )
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # what Trainer.train sets before its steps
    torch.manual_seed(0)  # the shuffle in _prepare_inputs
    inputs = trainer._prepare_inputs([{"prompt": p} for p in PROMPTS for _ in range(G)])
    nudge = 0.3 * torch.randn(inputs["old_per_token_logps"].shape, generator=torch.Generator().manual_seed(2))
    inputs["old_per_token_logps"] = inputs["old_per_token_logps"] + nudge
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    return trainer, inputs, loss


@pytest.mark.parametrize(
    ("beta", "lora", "checkpointing"),
    [(0.0, False, False), (0.04, False, True), (0.04, True, False)],
    ids=["beta0", "beta-ref-model-checkpointing", "beta-lora-ref-adapter-off"],
)
def test_grpo_matches_stock(tiny, tmp_path, monkeypatch, beta, lora, checkpointing):
    model, tokenizer = tiny
    model = with_lora(model) if lora else model
    spy = GroupSpy(monkeypatch)
    results = []
    for trainer_class in (GRPOTrainer, shared.SharedPromptGRPOTrainer):
        copy_ = copy.deepcopy(model)
        if checkpointing:  # transformers drops the KV cache: the engine's tree-mask mode
            copy_.gradient_checkpointing_enable()
        results.append(grpo_step(trainer_class, copy_, tokenizer, tmp_path, beta=beta))
    (stock, stock_inputs, stock_loss), (ours, inputs, loss) = results

    assert spy.calls and all(sizes == [G] * len(PROMPTS) for sizes in spy.calls)  # policy, old (and ref) log-probs
    assert len(spy.calls) == (3 if beta else 2)
    assert stock_inputs.keys() == inputs.keys()
    for key, value in stock_inputs.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(inputs[key], value, rtol=1e-5, atol=1e-5, msg=key)
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
    assert_metrics_match(ours._metrics["train"], stock._metrics["train"])
    assert ("kl" in ours._metrics["train"]) == bool(beta)
    assert max(ours._metrics["train"]["clip_ratio/region_mean"]) > 0
    assert_grads_match(ours.model, stock.model)


@pytest.mark.parametrize(
    ("option", "value"), [("entropy_coef", 0.01), ("use_adaptive_entropy", True), ("cast_lm_head_to_fp32", True)]
)
def test_grpo_refuses(tiny, tmp_path, option, value):
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=option):
        grpo_step(shared.SharedPromptGRPOTrainer, copy.deepcopy(model), tokenizer, tmp_path, **{option: value})


def test_grpo_refuses_moe_router_logits(tiny, tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    _, tokenizer = tiny
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    with pytest.raises(ValueError, match="router_aux_loss_coef"):
        grpo_step(shared.SharedPromptGRPOTrainer, MixtralForCausalLM(config), tokenizer, tmp_path)


# ---------------------------------------------------------------------------------------------------- DPO


def dpo_trainer(trainer_class, model, tokenizer, tmp_path, **config):
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(PAIRS), **COMMON, **config)
    dataset = Dataset.from_dict({k: [p[i] for p in PAIRS] for i, k in enumerate(("prompt", "chosen", "rejected"))})
    return trainer_class(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)


def dpo_step(trainer):
    """A batch from the trainer's own collator, then compute_loss and backward."""
    trainer.model.train()
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(len(PAIRS))]))
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss


@pytest.mark.parametrize(
    ("lora", "config"),
    [
        (False, {}),
        (False, {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.5}),
        (False, {"loss_type": "ipo", "use_weighting": True}),  # WPO weights: log_sum_sq_probs
        (True, {}),
    ],
    ids=["sigmoid-ref-model", "sigmoid-sft-ld-alpha", "ipo-wpo", "lora-ref-adapter-off"],
)
def test_dpo_matches_stock(tiny, tmp_path, monkeypatch, lora, config):
    model, tokenizer = tiny
    model = with_lora(model) if lora else model
    spy = GroupSpy(monkeypatch)
    stock = dpo_trainer(DPOTrainer, copy.deepcopy(model), tokenizer, tmp_path, **config)
    ours = dpo_trainer(shared.SharedPromptDPOTrainer, copy.deepcopy(model), tokenizer, tmp_path, **config)
    stock_loss, loss = dpo_step(stock), dpo_step(ours)

    assert spy.calls == [[2] * len(PAIRS)] * 2  # policy and reference: chosen and rejected share their prompt
    torch.testing.assert_close(loss, stock_loss, rtol=1e-5, atol=1e-6)
    metrics = ours._metrics["train"]
    for name in ("entropy", "logits/chosen", "mean_token_accuracy", "rewards/margins", "logps/rejected"):
        assert name in metrics
    assert_metrics_match(metrics, stock._metrics["train"])
    assert_grads_match(ours.model, stock.model)


def test_dpo_precomputed_reference_is_shared(tiny, tmp_path, monkeypatch):
    """With precompute_ref_log_probs=True, DPOTrainer.__init__ computes the reference log-probs before it returns:
    through the shared forward, equal to TRL's compute_ref_log_probs with its own forward."""
    model, tokenizer = tiny
    spy = GroupSpy(monkeypatch)
    ours = dpo_trainer(
        shared.SharedPromptDPOTrainer, copy.deepcopy(model), tokenizer, tmp_path, precompute_ref_log_probs=True
    )
    assert spy.calls == [[2] * len(PAIRS)]
    stock = dpo_trainer(DPOTrainer, copy.deepcopy(model), tokenizer, tmp_path)
    batch = stock.data_collator([stock.train_dataset[i] for i in range(len(PAIRS))])
    with torch.no_grad():
        chosen, rejected = stock.compute_ref_log_probs(stock.model, batch)
    torch.testing.assert_close(torch.tensor(ours.train_dataset["ref_chosen_logps"]), chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(ours.train_dataset["ref_rejected_logps"]), rejected, rtol=1e-5, atol=1e-5)


def test_dpo_refuses_prompt_learning_peft(tiny, tmp_path):
    model, tokenizer = tiny
    prompt_tuned = get_peft_model(copy.deepcopy(model), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    with pytest.raises(ValueError, match="prompt-learning PEFT"):
        dpo_trainer(shared.SharedPromptDPOTrainer, prompt_tuned, tokenizer, tmp_path)


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("padding_free", True, "padding_free"),
        ("aux_loss_enabled", True, "router_aux_loss_coef"),
        ("is_fsdp_enabled", True, "FSDP"),
        ("processing_class", ProcessorMixin.__new__(ProcessorMixin), "processing_class"),
        ("parallelism_config", SimpleNamespace(cp_size=2), "cp_size"),
    ],
)
def test_share_prompts_refuses_trainer_state(tiny, tmp_path, monkeypatch, attribute, value, message):
    """What padding-free, MoE, FSDP, vision and context-parallel runs leave on a trainer, set on a stock DPOTrainer
    (none of them runs here)."""
    model, tokenizer = tiny
    trainer = dpo_trainer(DPOTrainer, copy.deepcopy(model), tokenizer, tmp_path)
    if attribute == "parallelism_config":
        monkeypatch.setattr(type(trainer.accelerator), attribute, property(lambda self: value))
    else:
        monkeypatch.setattr(trainer, attribute, value)
    with pytest.raises(ValueError, match=message):
        shared.share_prompts(trainer)
    with pytest.raises(ValueError, match="GRPOTrainer and DPOTrainer"):
        shared.share_prompts(model)


# ---------------------------------------------------------------------------------------------------- the forward

OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def fused_pair(model, temperature=0.7):
    """(TRL's fused model, the same weights with the shared-prompt forward), every output field requested."""
    stock, ours = copy.deepcopy(model), copy.deepcopy(model)
    for m in (stock, ours):
        add_fused_lm_head(m, temperature=temperature, outputs=OUTPUTS)
    shared.share_prompts_in_forward(ours)
    return stock, ours


def mixed_batch():
    """(input_ids, attention_mask, labels): rows 0 and 3 share prompt P (row 0 left-padded), rows 1 and 4 prompt Q
    (right-padded); row 2 has no label; row 4 has a label hole in its completion."""
    P, Q = [1, 40, 41, 42, 43], [1, 50, 51]
    rows = [  # (left padding, prompt, completion, right padding)
        (2, P, [60, 61, 62], 0),
        (0, Q, [70, 71, 72], 4),
        (1, Q + [80, 81, 82, 83, 84, 85], [], 0),
        (0, P, [90, 91, 92, 93, 94], 0),
        (0, Q, [100, 101, 102, 103], 3),
    ]
    ids, attention, labels = [], [], []
    for left, prompt, completion, right in rows:
        ids.append([0] * left + prompt + completion + [0] * right)
        attention.append([0] * left + [1] * (len(prompt) + len(completion)) + [0] * right)
        labels.append([-100] * (left + len(prompt)) + completion + [-100] * right)
    labels[4][5] = -100
    return torch.tensor(ids), torch.tensor(attention), torch.tensor(labels)


def test_forward_matches_trl_field_by_field(tiny, monkeypatch):
    model, _ = tiny
    stock, ours = fused_pair(model)
    spy = GroupSpy(monkeypatch)
    ids, attention, labels = mixed_batch()
    expected = stock(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    got = ours(input_ids=ids, attention_mask=attention, labels=labels, fused_lm_head=True)
    assert spy.calls == [[2, 2]]  # two prompts, two completions each; row 2 is not scored
    assert torch.equal(got.label_mask, expected.label_mask) and got.is_top1.dtype == torch.bool
    assert torch.equal(got.is_top1, expected.is_top1)
    for name in ("loss", "log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        torch.testing.assert_close(getattr(got, name), getattr(expected, name), rtol=1e-5, atol=1e-5, msg=name)
    assert got.aux_loss is None
    upstream = torch.randn(expected.log_probs.shape)
    (got.log_probs * upstream).sum().backward()
    (expected.log_probs * upstream).sum().backward()
    assert_grads_match(ours, stock)


def test_forward_without_labels_and_generation_are_trl(tiny, monkeypatch):
    model, _ = tiny
    stock, ours = fused_pair(model)
    spy = GroupSpy(monkeypatch)
    ids = torch.tensor([[1, 40, 41, 42]])
    no_labels = torch.full_like(ids, -100)
    out = ours(input_ids=ids, labels=no_labels, fused_lm_head=True)
    assert spy.calls == [] and out.loss.requires_grad and (out.log_probs == 0).all()
    torch.testing.assert_close(ours(input_ids=ids).logits, stock(input_ids=ids).logits, rtol=0, atol=0)
    assert torch.equal(
        ours.generate(ids, max_new_tokens=3, do_sample=False), stock.generate(ids, max_new_tokens=3, do_sample=False)
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pixel_values": torch.zeros(1, 3, 4, 4)}, "pixel_values"),
        ({"shift_labels": torch.zeros(1, 6, dtype=torch.long)}, "shift_labels"),
        ({"attention_mask": torch.tensor([[1, 1, 0, 1, 1, 1]])}, "not contiguous"),
        ({"attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0]])}, "padding token"),
        ({"labels": torch.tensor([[-100, -100, -100, 7, 44, 45]])}, "differs from its input id"),
        ({"attention_mask": torch.tensor([[0, 0, 0, 1, 1, 1]])}, "first attended token"),
    ],
)
def test_forward_refuses(tiny, change, message):
    model, _ = tiny
    _, ours = fused_pair(model)
    inputs = {
        "input_ids": torch.tensor([[1, 40, 41, 43, 44, 45]]),
        "attention_mask": torch.ones(1, 6, dtype=torch.long),
        "labels": torch.tensor([[-100, -100, -100, 43, 44, 45]]),
        **change,
    }
    with pytest.raises(ValueError, match=message):
        ours(**inputs, fused_lm_head=True)


def test_refuses_unpatched_and_unsupported_heads(tiny):
    from transformers import GraniteConfig, GraniteForCausalLM

    model, _ = tiny
    with pytest.raises(ValueError, match="add_fused_lm_head"):
        shared.share_prompts_in_forward(copy.deepcopy(model))
    tiny_config = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    granite = GraniteForCausalLM(GraniteConfig(**tiny_config, num_attention_heads=2, logits_scaling=4.0))
    add_fused_lm_head(granite)
    with pytest.raises(ValueError, match="logits_scaling"):
        shared.share_prompts_in_forward(granite)
    capped = copy.deepcopy(model)
    capped.config.final_logit_softcapping = 30.0
    add_fused_lm_head(capped)
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        shared.share_prompts_in_forward(capped)
