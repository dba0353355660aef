"""Domain adaptation mechanics on the tiny models: LoRA targets per architecture, the KD loss, DAPT (loss falls,
merged model passes the parity gate, reproducible bytes), RAFT (EOS after the answer, abstention examples),
distillation and healing, and the one-line errors for bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fieldpack.builder.adapt import adapt_checkpoint, parse_adapt_options
from fieldpack.builder.adapt.data import raft_examples, read_qa_file
from fieldpack.builder.adapt.distill import check_same_tokenizer, kd_loss
from fieldpack.builder.stages.quant import split_eval
from fieldpack.shared.errors import AdaptationError
from fieldpack.shared.prompt_format import ABSTAIN_ANSWER
from tests.conftest import DEMO_DOCS

FAST = {"steps": 12, "seq_len": 64, "batch_size": 4, "lr": 3e-3, "lora_r": 8, "threads": 1}


@pytest.fixture(scope="module")
def split(demo_corpus: list[str]) -> tuple[list[str], list[str]]:
    return split_eval(demo_corpus, 0.2, 64, 0)


def _dapt(model_dir: Path, out: Path, split, **over) -> tuple[Path, object]:
    opts = parse_adapt_options({"method": "dapt", **FAST, **over})
    return adapt_checkpoint(model_dir, out, opts, train_texts=split[0], held_out_texts=split[1], seed=0)


# --- pure parts --------------------------------------------------------------------------------------------------
def test_kd_loss_is_ce_without_teacher_and_zero_kl_against_itself() -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    s, t = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    y = torch.randint(0, 11, (2, 5))
    y[0, 2] = -100
    ce = F.cross_entropy(s[:, :-1].reshape(-1, 11), y[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(kd_loss(s, None, y, alpha=0.5, temperature=2.0), ce)
    assert torch.allclose(kd_loss(s, s, y, alpha=1.0, temperature=2.0), torch.zeros(()), atol=1e-6)
    far = kd_loss(s, t, y, alpha=1.0, temperature=2.0)
    assert far > 0.01
    mixed = kd_loss(s, t, y, alpha=0.25, temperature=2.0)
    assert torch.allclose(mixed, 0.25 * far + 0.75 * ce, atol=1e-6)


def _kd_loss_whole(s, t, y, *, alpha: float, temperature: float):
    """The distillation loss computed the plain way, over the whole (batch, seq, vocab) at once."""
    import torch.nn.functional as F

    s, t, y = s[:, :-1], t[:, :-1], y[:, 1:]
    mask = y != -100
    n = mask.sum()
    ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), y.reshape(-1), ignore_index=-100, reduction="sum") / n
    log_ps, log_pt = F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1)
    kl = ((log_pt.exp() * (log_pt - log_ps)).sum(-1) * mask).sum() / n
    return alpha * temperature ** 2 * kl + (1 - alpha) * ce


@pytest.mark.parametrize("chunk_rows", [1, 3, 64])
def test_chunked_kd_loss_matches_the_whole_loss_and_its_gradient(monkeypatch: pytest.MonkeyPatch,
                                                                 chunk_rows: int) -> None:
    """The loss runs over vocabulary-wide row chunks under checkpointing (memory); value and gradient must be
    those of the loss computed whole, whatever the chunk size, with a teacher padded wider than the student."""
    import torch

    from fieldpack.builder.adapt import distill

    monkeypatch.setattr(distill, "KD_CHUNK_ELEMENTS", chunk_rows * 13)
    torch.manual_seed(1)
    t = torch.randn(3, 7, 15)  # teacher vocabulary padded to 15, student's is 13
    y = torch.randint(0, 13, (3, 7))
    y[1, 3:] = -100
    y[2, 0] = -100
    for alpha in (0.0, 0.3, 1.0):
        s1 = torch.randn(3, 7, 13, generator=torch.Generator().manual_seed(2), requires_grad=True)
        s2 = s1.detach().clone().requires_grad_(True)
        got = distill.kd_loss(s1, t, y, alpha=alpha, temperature=1.5)
        want = _kd_loss_whole(s2, t[..., :13], y, alpha=alpha, temperature=1.5)
        got.backward()
        want.backward()
        assert torch.allclose(got, want, atol=1e-5) and float(want) > 0
        assert torch.allclose(s1.grad, s2.grad, atol=1e-6)


def test_loss_on_target_positions_only_equals_the_full_logits_loss(tiny_gemma_dir: Path) -> None:
    """RAFT labels only the answer: the trainer projects only those positions onto the vocabulary
    (logits_to_keep); loss and LoRA gradients must be those of the full logits, with and without a teacher."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from fieldpack.builder.adapt.distill import kd_loss_aligned, target_positions
    from fieldpack.builder.adapt.train import accepts_logits_to_keep

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "down_proj"], init_lora_weights=False))
    teacher = AutoModelForCausalLM.from_pretrained(tiny_gemma_dir, dtype=torch.float32).eval()
    assert accepts_logits_to_keep(model) and accepts_logits_to_keep(teacher)
    ids = torch.randint(3, 200, (2, 40))
    labels = torch.full_like(ids, -100)
    labels[0, 30:36], labels[1, 33:40] = ids[0, 30:36], ids[1, 33:40]  # "answers" at different offsets
    pos = target_positions(labels)
    assert pos.tolist() == list(range(29, 39))
    assert target_positions(ids) is None  # DAPT blocks: every position has a target, nothing to skip
    for alpha, t_model in ((0.0, None), (0.5, teacher)):
        grads = []
        for sel in (False, True):
            model.zero_grad()
            kw = {"logits_to_keep": pos} if sel else {}
            out = model(input_ids=ids, **kw).logits
            t = None if t_model is None else t_model(input_ids=ids, **kw).logits.detach()
            loss = (kd_loss_aligned(out, t, labels[:, 1:][:, pos], alpha=alpha, temperature=2.0) if sel else
                    kd_loss(out, t, labels, alpha=alpha, temperature=2.0))
            loss.backward()
            grads.append((float(loss.detach()), [p.grad.clone() for p in model.parameters() if p.requires_grad]))
        assert abs(grads[0][0] - grads[1][0]) < 1e-5 and grads[0][0] > 0
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads[0][1], grads[1][1]))


@pytest.mark.parametrize("option,value,needle", [
    ("method", "lora", "--adapt 'lora'"), ("steps", 0, "--adapt-steps"), ("kd_alpha", 1.5, "outside [0, 1]"),
    ("bogus", 1, "unknown adaptation option"),
])
def test_bad_options_are_one_line(option: str, value: object, needle: str) -> None:
    with pytest.raises(AdaptationError) as e:
        parse_adapt_options({"method": "dapt", option: value})
    assert needle in str(e.value) and "Fix:" in str(e.value) and "\n" not in str(e.value)


def test_raft_without_questions_is_refused() -> None:
    with pytest.raises(AdaptationError, match="--qa-train"):
        parse_adapt_options({"method": "raft"})


def test_lora_targets_per_architecture(tiny_llama_dir: Path, tiny_qwen2_dir: Path, tiny_gemma_dir: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config

    from fieldpack.builder.adapt.lora import lora_targets

    for d in (tiny_llama_dir, tiny_qwen2_dir, tiny_gemma_dir):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(d))
        assert "q_proj" in lora_targets(model) and "down_proj" in lora_targets(model)
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(AdaptationError, match="GPT2LMHeadModel"):
        lora_targets(gpt2)


def test_qa_file_errors_name_the_line_and_field(tmp_path: Path) -> None:
    f = tmp_path / "qa.jsonl"
    f.write_text(json.dumps({"question": "q?", "answer": "a", "source": "database.md"}) + "\n"
                 + json.dumps({"question": "q?", "source": "database.md"}) + "\n")
    with pytest.raises(AdaptationError, match=r"qa.jsonl:2 has no 'answer'"):
        read_qa_file(f, DEMO_DOCS)
    f.write_text(json.dumps({"question": "q?", "answer": "a", "source": "nowhere.md"}) + "\n")
    with pytest.raises(AdaptationError, match="'nowhere.md' is not among the documents"):
        read_qa_file(f, DEMO_DOCS)
    with pytest.raises(AdaptationError, match="cannot be read"):
        read_qa_file(tmp_path / "missing.jsonl", DEMO_DOCS)


def test_teacher_with_another_tokenizer_is_refused(tiny_llama_dir: Path, tiny_gemma_dir: Path) -> None:
    with pytest.raises(AdaptationError, match="another tokenizer") as e:
        check_same_tokenizer(tiny_llama_dir, tiny_gemma_dir)
    assert str(tiny_gemma_dir) in str(e.value)
    check_same_tokenizer(tiny_llama_dir, tiny_llama_dir)


def test_too_little_data_for_the_steps(tiny_llama_dir: Path, tmp_path: Path, split) -> None:
    with pytest.raises(AdaptationError, match="lower --adapt-steps to at most"):
        _dapt(tiny_llama_dir, tmp_path / "out", split, steps=5000)
    assert not (tmp_path / "out").exists()


# --- training ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dapt_gemma(tiny_gemma_dir: Path, tmp_path_factory: pytest.TempPathFactory, split):
    return _dapt(tiny_gemma_dir, tmp_path_factory.mktemp("dapt") / "gemma-dapt", split)


def test_dapt_loss_falls_and_held_out_ppl_drops(dapt_gemma) -> None:
    _, rep = dapt_gemma
    assert rep.steps == FAST["steps"] and rep.tokens == FAST["steps"] * FAST["batch_size"] * FAST["seq_len"]
    assert rep.loss_last < rep.loss_first
    assert rep.ppl_after < rep.ppl_before and rep.kld_after > 0
    assert len(rep.train_sha256) == 64 and rep.train_sha256 != rep.held_out_sha256


def test_dapt_merged_checkpoint_passes_the_parity_gate(dapt_gemma, tiny_gemma_dir: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    from fieldpack.builder.convert import convert_hf_to_gguf
    from fieldpack.builder.parity import check_parity

    out, _ = dapt_gemma
    assert not any("lora" in k for k in load_file(str(out / "model.safetensors")))
    base = load_file(str(tiny_gemma_dir / "model.safetensors"))
    merged = load_file(str(out / "model.safetensors"))
    assert any(not (base[k] == merged[k]).all() for k in base if "q_proj" in k)  # the adapters were merged in
    conv = convert_hf_to_gguf(out, tmp_path / "adapted-f32.gguf", outtype="f32")
    report = check_parity(out, conv.path)
    assert report.passed and report.tokenization_identical


def test_dapt_replays_to_the_same_bytes(dapt_gemma, tiny_gemma_dir: Path, tmp_path: Path, split) -> None:
    from fieldpack.shared.bundle import hash_file

    out, _ = dapt_gemma
    again, _ = _dapt(tiny_gemma_dir, tmp_path / "again", split)
    assert hash_file(again / "model.safetensors")[1] == hash_file(out / "model.safetensors")[1]


def test_distillation_moves_the_student_towards_the_teacher(tiny_llama_dir: Path, tmp_path: Path, split) -> None:
    """Student: a copy of the tiny llama with noise on its weights; teacher: the tiny llama itself."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    student = tmp_path / "student"
    shutil.copytree(tiny_llama_dir, student)
    w = load_file(str(student / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    w = {k: (v + 0.02 * torch.randn(v.shape, generator=g) if v.ndim == 2 and "embed" not in k else v) for k, v in w.items()}
    save_file(w, str(student / "model.safetensors"), metadata={"format": "pt"})
    opts = parse_adapt_options({"method": "dapt", "teacher": str(tiny_llama_dir), "kd_alpha": 0.9, **FAST})
    _, rep = adapt_checkpoint(student, tmp_path / "out", opts, train_texts=split[0], held_out_texts=split[1])
    assert rep.method == "dapt+kd" and rep.teacher == tiny_llama_dir.name
    assert rep.teacher_kld_after < 0.9 * rep.teacher_kld_before
    assert rep.teacher_ppl < rep.ppl_before


QA = [("What should I run when trend screens are slow?", "Run VACUUM ANALYZE readings on HIST-1.", "database.md"),
      ("What do I check before restarting a pump?", "Check the suction pressure first.", "procedures/pumps.md")]


def _qa_file(tmp_path: Path) -> Path:
    docs = sorted(p.relative_to(DEMO_DOCS).as_posix() for p in DEMO_DOCS.rglob("*.md"))
    rows = [{"question": q, "answer": a, "source": s if s in docs else docs[0]} for q, a, s in QA]
    f = tmp_path / "qa.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows * 4))
    return f


def _chunks():
    from fieldpack.builder.ingest.model import Chunk

    out = []
    for p in sorted(DEMO_DOCS.rglob("*.md")):
        for i, para in enumerate(x for x in p.read_text().split("\n\n") if x.strip()):
            out.append(Chunk(source=p.relative_to(DEMO_DOCS).as_posix(), section="", page=None, line_start=i + 1,
                             line_end=i + 1, text=para, n_tokens=len(para) // 4, doc_sha256="0" * 64))
    return out


def test_raft_examples_cite_the_oracle_and_abstain(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from fieldpack.builder.prompt_plan import plan_prompt

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    pairs = read_qa_file(_qa_file(tmp_path), DEMO_DOCS)
    render = plan_prompt(None, "completion").renderer()
    ex, n_abstain = raft_examples(pairs, _chunks(), render, tok, stop_id=tok.eos_token_id, k=3,
                                  abstain_share=0.25, seed=0, max_len=4096)
    assert len(ex) == len(pairs) and n_abstain == 2
    answers = [tok.decode([t for t, l in zip(e.input_ids, e.labels) if l != -100]) for e in ex]
    assert all(e.input_ids[-1] == tok.eos_token_id and e.labels[-1] == tok.eos_token_id for e in ex)
    assert sum(ABSTAIN_ANSWER in a for a in answers) == 2
    cited = [a for a in answers if ABSTAIN_ANSWER not in a]
    assert all(a.strip().split("[")[-1][0] in "123" for a in cited)
    prompt = tok.decode([t for t, l in zip(ex[0].input_ids, ex[0].labels) if l == -100])
    assert "Sources:" in prompt and prompt.rstrip().endswith("Answer:")


def test_raft_examples_over_the_length_say_how_many_and_the_seq_len_that_keeps_them(
        tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A trial: 8 of 16 QA pairs were dropped with a warning that named no fix. The warning counts them and
    names the --adapt-seq-len (examples may be twice its length) that keeps every one; when none fits, the
    error names it."""
    import math

    from transformers import AutoTokenizer

    from fieldpack.builder.prompt_plan import plan_prompt

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    pairs = read_qa_file(_qa_file(tmp_path), DEMO_DOCS)
    render = plan_prompt(None, "completion").renderer()
    kw = dict(stop_id=tok.eos_token_id, k=3, abstain_share=0.25, seed=0)
    lengths = sorted(len(e.input_ids) for e in raft_examples(pairs, _chunks(), render, tok, max_len=4096, **kw)[0])
    cut = lengths[len(lengths) // 2]
    over = [n for n in lengths if n > cut]
    assert over, lengths
    with caplog.at_level("WARNING", logger="fieldpack.builder.adapt.data"):
        kept, _ = raft_examples(pairs, _chunks(), render, tok, max_len=cut, **kw)
    assert len(kept) == len(lengths) - len(over)
    want = f"raise --adapt-seq-len to {math.ceil(max(over) / 2)}"
    assert f"{len(over)} of {len(lengths)} examples" in caplog.text and want in caplog.text
    with pytest.raises(AdaptationError, match=f"longer than {lengths[0] - 1} tokens") as err:
        raft_examples(pairs, _chunks(), render, tok, max_len=lengths[0] - 1, **kw)
    assert f"raise --adapt-seq-len to {math.ceil(lengths[-1] / 2)}" in str(err.value.hint)


def test_held_out_evaluation_reports_its_progress(tiny_gemma_dir: Path, split) -> None:
    """The held-out PPL/KLD passes before and after training took most of a trial's adapt stage behind a bar
    that read 0/?: each pass reports its blocks, under a unit the CLI tells apart from the training steps."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fieldpack.builder.adapt.data import eval_blocks
    from fieldpack.builder.adapt.train import evaluate
    from fieldpack.builder.progress import is_evaluation, progress_sink

    tok = AutoTokenizer.from_pretrained(str(tiny_gemma_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gemma_dir), torch_dtype="float32")
    blocks = eval_blocks(split[1], tok, 32)
    seen: list[tuple[int, int, str]] = []
    with progress_sink(lambda d, t, u: seen.append((d, t, u))):
        fig = evaluate(model, blocks, threads=1, label="PPL before training")
    n = len(blocks)
    assert n > 1 and fig.tokens > 0
    assert [d for d, _, _ in seen] == list(range(n + 1)) and {t for _, t, _ in seen} == {n}
    assert {u for _, _, u in seen} == {"held-out blocks: PPL before training"} and is_evaluation(seen[0][2])
    assert not is_evaluation("steps, loss 3.398, 6 tok/s")


def test_hard_distractors_are_the_other_documents_closest_to_the_question() -> None:
    from fieldpack.builder.adapt.data import hard_distractor_ranker

    chunks = _chunks()
    ranked = hard_distractor_ranker(chunks)("What should I check before restarting a pump after cavitation?",
                                            "database.md")
    assert ranked and all(chunks[j].source != "database.md" for j in ranked)
    assert len({chunks[j].source for j in ranked}) == len(ranked)  # one chunk per document
    assert chunks[ranked[0]].source == "procedures/pumps.md"  # the pump page shares the rare words


def test_paired_raft_shows_abstaining_questions_with_and_without_their_oracle(tiny_llama_dir: Path,
                                                                              tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from fieldpack.builder.prompt_plan import plan_prompt

    tok = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    pairs = read_qa_file(_qa_file(tmp_path), DEMO_DOCS)
    render = plan_prompt(None, "completion").renderer()
    ex, n_abstain = raft_examples(pairs, _chunks(), render, tok, stop_id=tok.eos_token_id, k=3, abstain_share=0.25,
                                  seed=0, max_len=4096, hard=1, paired=True)
    assert n_abstain == 2 and len(ex) == len(pairs) + 2  # every question answered once, two also abstain
    prompts = [tok.decode([t for t, l in zip(e.input_ids, e.labels) if l == -100]) for e in ex]
    answers = [tok.decode([t for t, l in zip(e.input_ids, e.labels) if l != -100]) for e in ex]
    abstaining = [i for i, a in enumerate(answers) if ABSTAIN_ANSWER in a]
    assert len(abstaining) == 2
    for i in abstaining:  # its twin (same question) answers and cites; the sources differ only by the oracle
        q = prompts[i].split("Question:")[-1]
        twins = [j for j in range(len(ex)) if j != i and prompts[j].split("Question:")[-1] == q
                 and ABSTAIN_ANSWER not in answers[j]]
        assert twins, prompts[i][-200:]
    default, _ = raft_examples(pairs, _chunks(), render, tok, stop_id=tok.eos_token_id, k=3, abstain_share=0.25,
                               seed=0, max_len=4096)
    assert len(default) == len(pairs)  # off by default: RAFT's own recipe


@pytest.mark.slow
def test_raft_teaches_the_model_to_end_its_answer(tiny_llama_dir: Path, tmp_path: Path, split) -> None:
    """After RAFT the tiny model ends its answer with EOS within the answer's length (before: it runs on)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fieldpack.builder.prompt_plan import plan_prompt

    render = plan_prompt(None, "completion").renderer()
    opts = parse_adapt_options({"method": "raft", "qa_train": str(_qa_file(tmp_path)), **FAST, "steps": 40, "lr": 5e-3,
                                "seq_len": 512, "batch_size": 2, "raft_k": 1, "raft_abstain": 0.25})
    out, rep = adapt_checkpoint(tiny_llama_dir, tmp_path / "raft", opts, train_texts=split[0],
                                held_out_texts=split[1], chunks=_chunks(), render=render)
    assert rep.loss_last < rep.loss_first and rep.n_abstain == 2
    tok = AutoTokenizer.from_pretrained(str(out))
    chunks = _chunks()
    from fieldpack.builder.adapt.data import as_source, pick_oracle

    q, _, s = QA[0]
    pair = read_qa_file(_qa_file(tmp_path), DEMO_DOCS)[0]
    prompt = render(q, [as_source(chunks[pick_oracle(pair, chunks)], 0)], [])
    ids = tok(prompt, return_tensors="pt")["input_ids"]

    def gen(model_dir: Path) -> list[int]:
        m = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
        with torch.no_grad():
            o = m.generate(ids, max_new_tokens=48, do_sample=False, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.eos_token_id)
        return o[0, ids.shape[1]:].tolist()

    tuned = gen(out)
    assert tok.eos_token_id in tuned, tok.decode(tuned)
    assert "[1]" in tok.decode(tuned[:tuned.index(tok.eos_token_id)])


def test_raft_benchmark_training_file_is_valid_and_keeps_unseen_questions_out() -> None:
    """benchmarks/qa/postgresql-15.raft-train.jsonl: every line reads as --qa-train input against the installed
    PostgreSQL pages (fields, sources), and no line is a question of the QA set's unseen split."""
    from benchmarks.raft import QA_FILE, TRAIN_FILE, disjoint_pairs, unseen_items

    docs = Path("/usr/share/doc/postgresql-doc-15/html")
    if not docs.is_dir():
        pytest.skip("postgresql-doc-15 is not installed (scripts/setup.sh installs it)")
    pairs = read_qa_file(TRAIN_FILE, docs)
    answerable, unanswerable = unseen_items(QA_FILE)
    assert len(pairs) >= 90 and len(answerable) >= 20 and unanswerable
    kept = disjoint_pairs(pairs, answerable)
    unseen_pages = {p for r in answerable for p in [r["expected_source"], *r.get("also_ok", [])]}
    assert kept and all(p.source not in unseen_pages for p in kept) and len(kept) < len(pairs)
    assert not {p.question for p in pairs} & {r["question"] for r in answerable + unanswerable}
