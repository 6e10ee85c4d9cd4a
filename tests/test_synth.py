import json
import re
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from semidyn_rag.training import density_label, read_jsonl
from semidyn_rag.training.synth import (
    HFTeacher,
    OpenAITeacher,
    Seed,
    SynthConfig,
    TeacherError,
    grounded,
    load_seeds,
    parse_json,
    synthesize,
)

GOOD = [
    "The code of Alpha is 4711. Alpha lives in a small red house near the old mill by the river.",
    "Berlin is the capital of Germany and has many museums, parks, lakes and long wide streets.",
    "Alice was born in 1990 in Lyon and moved to Oslo in 2004 together with her younger sister.",
]
BAD = {
    "MALFORMED": "MALFORMED text: the tower is tall and made of grey stone from the northern hills.",
    "UNGROUNDED": "UNGROUNDED text: the lake is deep and cold all year round in this quiet valley.",
    "LONGSUMMARY": "LONGSUMMARY text: the bridge is long and crosses the wide river at the town.",
    "EMPTY": "EMPTY text: the garden has roses, tulips and an old apple tree beside the wall.",
    "FLAKY": "FLAKY text: the train leaves at nine from platform two and arrives at noon in Bern.",
    "DOWN": "DOWN text: the ship sails to the island every morning when the sea is calm and clear.",
}


class StubTeacher(BaseHTTPRequestHandler):
    """A minimal OpenAI-compatible chat-completions server with scripted misbehaviour."""

    calls: ClassVar[Counter] = Counter()
    auth: ClassVar[list] = []

    def log_message(self, *args):  # keep test output quiet
        pass

    def _reply(self, status: int, content: str | None = None) -> None:
        body = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        if self.path != "/v1/chat/completions":
            return self._reply(404)
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).auth.append(self.headers.get("Authorization"))
        prompt = request["messages"][-1]["content"]
        text = prompt.split("Text:\n", 1)[-1]
        marker = next((m for m in BAD if m in text), None) if "Text:\n" in prompt else None
        type(self).calls[marker] += 1
        if marker == "DOWN" or (marker == "FLAKY" and type(self).calls["FLAKY"] == 1):
            return self._reply(500)
        words = text.split()
        if "extremely concise" in prompt:
            if marker == "EMPTY":
                return self._reply(200, "   ")
            if marker == "LONGSUMMARY":
                return self._reply(200, f"{text} {text}")
            return self._reply(200, " ".join(words[: len(words) // 3]))
        if "question-answer pairs" in prompt:
            if marker == "MALFORMED":
                return self._reply(200, "Sure! Q: what is tall? A: the tower")
            answer = "purple elephants" if marker == "UNGROUNDED" else " ".join(words[1:3])
            pairs = [
                {"question": "What is mentioned first?", "answer": answer},
                {"question": "What else?", "answer": words[-1].strip(".")},
            ]
            return self._reply(200, f"```json\n{json.dumps(pairs)}\n```")
        if "Summarize the text" in prompt:
            return self._reply(200, " ".join(words[: len(words) // 2]))
        if "passages" in prompt:
            first = re.search(r"Passage 1:\n(.*)", prompt).group(1).split()
            return self._reply(200, json.dumps({"question": "Which?", "answer": first[-1]}))
        return self._reply(400)


@pytest.fixture
def stub_url():
    StubTeacher.calls = Counter()
    StubTeacher.auth = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), StubTeacher)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def seeds() -> list[Seed]:
    texts = GOOD + list(BAD.values())
    return [Seed(id=f"s{i}", text=t) for i, t in enumerate(texts)]


def test_synthesis_against_an_openai_compatible_server(stub_url, tmp_path):
    teacher = OpenAITeacher(stub_url, "stub-model", api_key="k", max_retries=1, backoff=0)
    out = tmp_path / "synth.jsonl"
    config = SynthConfig(qa_per_seed=2, min_context_tokens=5, temperature=0)
    stats = synthesize(seeds(), teacher, out, config)

    assert StubTeacher.auth and set(StubTeacher.auth) == {"Bearer k"}
    assert stats.seeds_total == 9 and stats.seeds_processed == 8 and stats.seeds_failed == 1
    assert stats.filtered == {
        "density:empty": 1,
        "density:summary_not_shorter": 1,
        "qa:unparseable_json": 2,
        "qa:answer_not_grounded": 1,
    }
    # 8 seeds: density for 6, qa pairs (2 each) for 6 + 1 grounded in UNGROUNDED, summary and
    # multi-doc for all 8
    assert stats.kept == {"density": 6, "qa": 13, "summary": 8, "multi_doc": 8}
    records = read_jsonl(out)
    assert len(records) == stats.num_kept
    by_seed = {}
    for r in records:
        assert r.provenance["teacher"] == "openai:stub-model" and r.source == "synth"
        by_seed.setdefault(r.provenance["seed_id"], []).append(r)
    [density] = [r for r in by_seed["s0"] if r.provenance["kind"] == "density"]
    ctx_words, sum_words = len(GOOD[0].split()), len(density.answer.split())
    assert density.provenance["ctx_tokens"] == ctx_words
    assert density.y == [pytest.approx(density_label(ctx_words, sum_words))]
    assert all(r.y == density.y for r in by_seed["s0"] if r.provenance["kind"] != "multi_doc")
    empty_seed = next(r for r in records if "EMPTY" in r.contexts[0])
    assert empty_seed.y is None  # no label: its density answer was filtered
    multi = [r for r in records if r.provenance["kind"] == "multi_doc"]
    assert all(len(r.contexts) == 3 and grounded(r.answer, " ".join(r.contexts)) for r in multi)
    assert StubTeacher.calls["FLAKY"] == 4  # one retried 500, then three single-text tasks

    # a second run skips the finished seeds and retries only the failed one
    before = sum(StubTeacher.calls.values())
    again = synthesize(seeds(), teacher, out, config)
    assert again.seeds_already_done == 8 and again.seeds_failed == 1
    assert sum(StubTeacher.calls.values()) - before == 2  # DOWN's first task, tried twice
    assert len(read_jsonl(out)) == len(records)


def test_teacher_protocol_errors(stub_url):
    teacher = OpenAITeacher(stub_url.replace("/v1", "/nope"), "m", max_retries=0)
    with pytest.raises(TeacherError, match="HTTP 404"):
        teacher.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)
    dead = OpenAITeacher("http://127.0.0.1:9/v1", "m", max_retries=1, backoff=0, timeout=2)
    with pytest.raises(TeacherError, match="gave up after 2 tries"):
        dead.chat([{"role": "user", "content": "hi"}], max_tokens=4, temperature=0)


def test_malformed_teacher_output_is_recognised():
    assert parse_json(
        '<think>hmm {"x": 1}</think>```json\n[{"question": "q", "answer": "a"}]\n```'
    ) == [{"question": "q", "answer": "a"}]
    assert parse_json('Here you go: {"question": "q", "answer": 3} thanks') == {
        "question": "q",
        "answer": 3,
    }
    for bad in ("no json at all", '{"question": "q", "answer": ', "[1, 2"):
        with pytest.raises(ValueError):
            parse_json(bad)
    assert grounded("the Old Mill", "near the old mill, by the river")
    assert not grounded("purple elephants", "near the old mill")
    assert not grounded("  ", "anything")
    assert grounded(
        "born in Lyon in 1990 with sister", "Alice was born in 1990 in Lyon with her sister"
    )


def test_seed_files(tmp_path):
    (tmp_path / "s.txt").write_text("First paragraph here.\n\nSecond one.\n\n\n")
    (tmp_path / "s.jsonl").write_text('{"id": "a", "text": "Hello there."}\n{"content": "Hi."}\n')
    pq.write_table(pa.table({"context": ["One.", "Two."]}), tmp_path / "s.parquet")
    txt = load_seeds(tmp_path / "s.txt")
    assert [s.text for s in txt] == ["First paragraph here.", "Second one."]
    assert txt[0].id != txt[1].id and load_seeds(tmp_path / "s.txt") == txt  # stable ids
    assert load_seeds(tmp_path / "s.jsonl")[0].id == "a"
    assert [s.text for s in load_seeds(tmp_path / "s.parquet")] == ["One.", "Two."]
    (tmp_path / "bad.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(ValueError, match="row 0"):
        load_seeds(tmp_path / "bad.jsonl")


def test_synthesis_with_a_tiny_local_model_filters_its_garbage(tiny_dir, tmp_path):
    teacher = HFTeacher(str(tiny_dir))
    config = SynthConfig(
        tasks=["density", "qa", "summary"],
        qa_per_seed=2,
        max_new_tokens=12,
        temperature=0,
        min_context_tokens=5,
    )
    out = tmp_path / "tiny.jsonl"
    stats = synthesize(seeds()[:2], teacher, out, config)
    assert stats.seeds_processed == 2
    # greedy decoding of random weights gives whitespace: every answer is dropped and counted
    assert stats.num_kept == 0 and read_jsonl(out) == []
    assert stats.filtered == {"density:empty": 2, "qa:unparseable_json": 4, "summary:empty": 2}


def test_cli_synth(stub_url, tmp_path, capsys):
    from semidyn_rag.cli import main

    seed_file = tmp_path / "seeds.txt"
    seed_file.write_text("\n\n".join(GOOD))
    out = tmp_path / "out.jsonl"
    args = [
        "synth",
        "--seeds",
        str(seed_file),
        "--out",
        str(out),
        "--openai-url",
        stub_url,
        "--teacher-model",
        "stub",
        "--tasks",
        '["density", "qa"]',
        "--min-context-tokens",
        "5",
    ]
    assert main(["-q", *args]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["kept"] == {"density": 3, "qa": 6} and stats["filtered"] == {}
    assert len(read_jsonl(out)) == 9
