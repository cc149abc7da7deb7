"""Real-model check: SmolLM2-135M-Instruct with its own chat template and LoRA, beside the tiny-model tests.

    .venv/bin/python benchmarks/real_model_check.py MODEL_DIR     # e.g. a `materialize` of pkg:smollm2

Checks the pair encoder on the real template (prompt + response = the conversation, one <|im_end|> per
response), one SGD step at weights [1.0] with LoRA against TRL's DPOTrainer (both take the policy as it starts
as the reference), and that a LoRA SFT folder as the start gives the merged SFT model as the reference.
"""
import copy, sys, tempfile, time
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import DPOConfig, DPOTrainer
from modpo import MODPOConfig, MODPOTrainer
from modpo.data.encode import encode, encode_prompt
from modpo.logps import batched_sequence_logps

torch.set_num_threads(2)
BASE = sys.argv[1]
tok = AutoTokenizer.from_pretrained(BASE)
rows = [
    {"prompt": [{"role": "user", "content": "How do I boil an egg?"}],
     "chosen": [{"role": "assistant", "content": "Put it in boiling water for nine minutes, then cool it."}],
     "rejected": [{"role": "assistant", "content": "No idea."}]},
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."},
                {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}],
     "chosen": [{"role": "assistant", "content": "Green."}],
     "rejected": [{"role": "assistant", "content": "I would rather talk about eggs."}]},
]
end = tok.convert_tokens_to_ids("<|im_end|>")
for row in rows:
    p, (c, r) = encode(row["prompt"], [row["chosen"], row["rejected"]], tok)
    assert p == encode_prompt(row["prompt"], tok)
    for side, ids in (("chosen", c), ("rejected", r)):
        whole = tok(tok.apply_chat_template(row["prompt"] + row[side], tokenize=False), add_special_tokens=False)["input_ids"]
        assert p + ids == whole
        assert ids.count(end) == 1 and tok.decode(ids).endswith("<|im_end|>\n"), tok.decode(ids)
        assert p.count(end) == len(row["prompt"]) + (row["prompt"][0]["role"] != "system")  # default system message
print("encoder on SmolLM2's template: prompt + response = conversation; one <|im_end|> per response, then '\\n'")

lora = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            task_type="CAUSAL_LM")
base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
torch.manual_seed(0)
start = get_peft_model(copy.deepcopy(base), LoraConfig(**lora, init_lora_weights=True))
with torch.no_grad():  # a non-zero B so the update reaches every LoRA weight
    for name, p in start.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.02)
tmp = tempfile.mkdtemp()
data = Dataset.from_list(rows)
common = dict(bf16=False, report_to=[], use_cpu=True, per_device_train_batch_size=2, max_length=512, save_strategy="no",
              seed=0, optim="sgd", learning_rate=1.0, max_steps=1, max_grad_norm=0.0, lr_scheduler_type="constant",
              logging_steps=1, disable_tqdm=True)
t0 = time.time()
# Both take the policy as it starts (adapter on) as the reference: TRL 1.16 for a PeftModel, modpo by its rule.
trl = DPOTrainer(model=copy.deepcopy(start), ref_model=None, processing_class=tok, train_dataset=data,
                 args=DPOConfig(output_dir=tmp + "/t", gradient_checkpointing=False, beta=0.1, **common))
ours = MODPOTrainer(copy.deepcopy(start), processing_class=tok, train_dataset=data,
                    args=MODPOConfig(output_dir=tmp + "/m", weights=[1.0], beta=0.1, cache_dir=tmp + "/c", **common))
for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
    assert trl.train_dataset[column] == ours.train_dataset[column], column
updates = []
for trainer in (trl, ours):
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    updates.append(torch.cat([(after[n].detach() - before[n]).reshape(-1) for n in sorted(before)]))
rel = ((updates[1] - updates[0]).norm() / updates[0].norm()).item()
print(f"one SGD step, LoRA r=8, chat rows, weights [1.0]: relative update difference to TRL {rel:.2e} "
      f"(update norm {updates[0].norm():.3g}; {time.time() - t0:.0f} s)")
assert rel < 0.01

# A LoRA SFT folder as the start, with a new peft_config: the reference is the merged SFT model.
sft_dir = tmp + "/lora_sft"
start.save_pretrained(sft_dir)
tok.save_pretrained(sft_dir)
trainer = MODPOTrainer(sft_dir, args=MODPOConfig(output_dir=tmp + "/s", weights=[1.0], cache_dir=tmp + "/c2",
                                                **{**common, "learning_rate": 1e-4}),
                       train_dataset=data, peft_config=LoraConfig(**lora))
merged = copy.deepcopy(start).merge_and_unload()
expected = batched_sequence_logps(merged, trainer.train_dataset["prompt_ids"], trainer.train_dataset["chosen_ids"],
                                  tok.pad_token_id)
got = torch.tensor(trainer.train_dataset["ref_chosen_logps"])
base_logps = batched_sequence_logps(base, trainer.train_dataset["prompt_ids"], trainer.train_dataset["chosen_ids"],
                                    tok.pad_token_id)
print(f"LoRA SFT folder as start: |ref - merged SFT| = {(got - expected).abs().max():.2e}, "
      f"|ref - base| = {(got - base_logps).abs().max():.3g}")
assert torch.allclose(got, expected, atol=1e-3) and not torch.allclose(got, base_logps, atol=1e-3)
print("real-model check passed")
