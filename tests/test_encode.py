"""The pair encoder on two real chat-template conventions built here (ChatML as SmolLM2 ships it, Llama 3 with BOS
inside the template), text rows, and one SGD step through MODPOTrainer against TRL's DPOTrainer on chat rows."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

import tiny
from modpo import MODPOConfig, MODPOTrainer, RewardModelMargins
from modpo.data.encode import encode, encode_prompt, fit, sequence_ids
from modpo.data.formats import tokenize_preferences

CONVENTIONS = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}

CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": "Tell me a story about a cat."}],
     "chosen": [{"role": "assistant", "content": "The cat sat on the mat."}],
     "rejected": [{"role": "assistant", "content": "No."}]},
    {"prompt": [{"role": "system", "content": "You are fine."}, {"role": "user", "content": "Hello friend"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Write a short poem."}],
     "chosen": [{"role": "assistant", "content": "Sure, here it is: roses are red."}],
     "rejected": [{"role": "assistant", "content": "The dog ran in the park!"}]},
]
MIXED_ROW = {"prompt": "How are you today?",  # a text prompt with message responses: one user turn
             "chosen": [{"role": "assistant", "content": "I am fine, thank you."}],
             "rejected": [{"role": "assistant", "content": "Tell me a story."}]}


def conversation_ids(tok, prompt, response) -> list[int]:
    """The whole conversation as the template renders it, tokenized without adding special tokens."""
    messages = ([{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt) + response
    return tok(tok.apply_chat_template(messages, tokenize=False), add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_prompt_and_response_are_the_whole_conversation(convention):
    tok = tiny.bpe_tokenizer(convention)
    end_of_turn = tok.convert_tokens_to_ids(CONVENTIONS[convention])
    for row in CHAT_ROWS + [MIXED_ROW]:
        prompt_ids, responses = encode(row["prompt"], [row["chosen"], row["rejected"]], tok)
        assert prompt_ids == encode_prompt(row["prompt"], tok, chat=True)  # what sampling is given
        for side, response_ids in zip(("chosen", "rejected"), responses):
            assert prompt_ids + response_ids == conversation_ids(tok, row["prompt"], row[side])
            # the response ends with the template's end of turn, once: no second eos after it
            assert response_ids.count(end_of_turn) == 1
            after = tok.decode(response_ids[response_ids.index(end_of_turn) + 1:])
            assert after.strip() == "", after  # only what the template itself writes after a turn ("\n" in ChatML)
            assert tok.decode(response_ids).startswith(row[side][0]["content"])
        if convention == "llama3":  # BOS once, from the template; the tokenizer would add a second one to text
            assert prompt_ids.count(tok.bos_token_id) == 1 and prompt_ids[0] == tok.bos_token_id


def test_text_rows_end_with_eos_once():
    tok = tiny.bpe_tokenizer("llama3")
    prompt_ids, (chosen, rejected) = encode("Tell me a story.", [" The cat sat.", " No.<|eot_id|>"], tok)
    assert prompt_ids == tok("Tell me a story.")["input_ids"] and prompt_ids[0] == tok.bos_token_id
    assert chosen == tok(" The cat sat.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert rejected == tok(" No.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    _, (without,) = encode("Tell me a story.", [" The cat sat."], tok, append_eos=False)
    assert without == chosen[:-1]


def test_fit_cuts_responses_from_the_right_and_long_prompts_from_the_left():
    fitted = fit(list(range(3)), [[10, 11, 12, 13], [20]], max_length=5)
    assert fitted.prompt_ids == [0, 1, 2] and fitted.response_ids == [[10, 11], [20]] and fitted.responses_cut == 1
    long = fit(list(range(8)), [[10, 11]], max_length=6)
    assert long.prompt_cut and long.prompt_ids == [5, 6, 7] and long.response_ids == [[10, 11]]
    assert fit(list(range(8)), [[10]], max_length=6, long_prompts="drop") is None
    with pytest.raises(ValueError, match="8 tokens"):
        fit(list(range(8)), [[10]], max_length=6, long_prompts="refuse")


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_reward_model_scores_the_tokens_trl_trains_it_on(convention, tmp_path):
    """TRL's RewardTrainer tokenizes prompt + chosen as one conversation (chat rows) or one text ending with the
    eos string (text rows); the reward-model source scores exactly those ids."""
    from trl import RewardConfig, RewardTrainer

    tok = tiny.bpe_tokenizer(convention)
    text_rows = [{"prompt": "Tell me a story.", "chosen": " The cat sat on the mat.", "rejected": " No."}]
    for rows in (CHAT_ROWS, text_rows):
        args = RewardConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False,
                            gradient_checkpointing=False)
        model = tiny.model(len(tok), num_labels=1)
        model.config.pad_token_id = tok.pad_token_id
        trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        for i, row in enumerate(rows):
            for side in ("chosen", "rejected"):
                assert sequence_ids(row["prompt"], row[side], tok, 1024) == trainer.train_dataset[i][f"{side}_ids"]
        source = RewardModelMargins(model, tokenizer=tok)
        scores = source.score(Dataset.from_list(rows), "chosen")
        with torch.no_grad():
            direct = [model(torch.tensor([trainer.train_dataset[i]["chosen_ids"]])).logits[0, 0] for i in range(len(rows))]
        assert torch.allclose(scores[:, 0], torch.stack(direct), atol=1e-5)


def test_reward_model_keeps_the_end_of_a_long_input():
    tok = tiny.bpe_tokenizer("chatml")
    row = CHAT_ROWS[1]
    whole = conversation_ids(tok, row["prompt"], row["chosen"])
    assert sequence_ids(row["prompt"], row["chosen"], tok, 12) == whole[-12:]


@pytest.mark.parametrize("convention", list(CONVENTIONS))
def test_one_sgd_step_on_chat_rows_equals_trl_dpo(convention, tmp_path):
    """What was compared: TRL 1.16's DPOTrainer and MODPOTrainer(weights=[1.0]) get the same policy, the same
    explicit reference, the same chat rows and beta; each tokenizes the rows itself (the token columns must be
    equal) and takes one plain SGD step on one batch of every row. The parameter updates agree within 1%."""
    from trl import DPOConfig, DPOTrainer

    tok = tiny.bpe_tokenizer(convention)
    reference = tiny.model(len(tok), seed=4, layers=2)
    policy = tiny.perturbed(reference, seed=5, scale=0.2)
    data = Dataset.from_list(CHAT_ROWS)
    common = dict(bf16=False, report_to=[], use_cpu=True, per_device_train_batch_size=len(data), max_length=256,
                  save_strategy="no", seed=0, optim="sgd", learning_rate=1.0, max_steps=1, max_grad_norm=0.0,
                  lr_scheduler_type="constant", logging_steps=1)
    trl = DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=tok,
                     args=DPOConfig(output_dir=str(tmp_path / "trl"), gradient_checkpointing=False, beta=0.5,
                                    precompute_ref_log_probs=True, **common), train_dataset=data)
    ours = MODPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(reference), processing_class=tok,
                        args=MODPOConfig(output_dir=str(tmp_path / "modpo"), weights=[1.0], beta=0.5, **common),
                        train_dataset=data)
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert trl.train_dataset[column] == ours.train_dataset[column], column
    updates = []
    for trainer in (trl, ours):
        trainer.train()
        updates.append(torch.cat([(after.detach() - before).reshape(-1) for before, after
                                  in zip(policy.parameters(), trainer.model.parameters())]))
    trl_update, modpo_update = updates
    assert trl_update.norm() > 1e-3, "no update: the comparison would be vacuous"
    assert (modpo_update - trl_update).norm() / trl_update.norm() < 0.01


def test_training_columns_are_the_encoder_output_on_chat_rows():
    tok = tiny.bpe_tokenizer("chatml")
    out = tokenize_preferences(Dataset.from_list(CHAT_ROWS), tok, max_length=1024)
    for i, row in enumerate(CHAT_ROWS):
        prompt_ids, (chosen, rejected) = encode(row["prompt"], [row["chosen"], row["rejected"]], tok)
        assert (out[i]["prompt_ids"], out[i]["chosen_ids"], out[i]["rejected_ids"]) == (prompt_ids, chosen, rejected)


def test_sampling_prompts_are_encoded_as_training_encoded_them(tmp_path):
    """Chat training rows (here `as_chat`: a text prompt with chat-message responses is templated by `encode`)
    make a front's text evaluation prompts user turns: sampled from the ids training scored responses after. With
    text training rows a text prompt stays text."""
    from modpo.front.sweep import evaluation_prompts

    tok = tiny.bpe_tokenizer("chatml")
    rows = [{"prompt": "Tell me a story.", "chosen": "The cat sat on the mat.", "rejected": "No."}]
    path = tiny.write_jsonl(tmp_path / "rows.jsonl", rows)
    chat_rows = [{**rows[0], **{side: [{"role": "assistant", "content": rows[0][side]}] for side in ("chosen", "rejected")}}]
    (trained, _), (text, _) = (encode(r["prompt"], [r["chosen"], r["rejected"]], tok) for r in chat_rows + rows)
    (prompt,) = evaluation_prompts([rows[0]["prompt"]], {"loader": "jsonl", "path": path, "as_chat": True})
    assert encode_prompt(prompt, tok) == trained
    assert tok.decode(trained).endswith("<|im_start|>assistant\n")
    (prompt,) = evaluation_prompts([rows[0]["prompt"]], path)
    assert prompt == rows[0]["prompt"] and encode_prompt(prompt, tok) == text
    (prompt,) = evaluation_prompts({"loader": "jsonl", "path": path, "as_chat": True})  # rows of a file: as encoded
    assert encode_prompt(prompt, tok) == trained
