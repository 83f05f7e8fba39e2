"""llama.cpp at run time (issue 12): greedy decoding that never picks suppressed ids, a GGUF's task metric scored on
its own replies, and the OpenAI-compatible server, started exactly as server_command says (issue 24), answering a chat
completion and stopping with its block."""
import pytest

from lora_course import llama_runtime
from lora_course.export import ExportError


# --------------------------------------------------------------------------------------------------- decoding
def test_gguf_greedy_never_picks_suppressed_ids(tiny_gguf, tiny_tok):
    llm = llama_runtime.load_gguf(tiny_gguf, n_threads=1)
    ids = tiny_tok("The sea", add_special_tokens=False)["input_ids"]
    free = llama_runtime.gguf_greedy(llm, ids, 8)
    assert len(free) == 8 and free == llama_runtime.gguf_greedy(llm, ids, 8)  # deterministic
    banned = llama_runtime.gguf_greedy(llm, ids, 8, suppress_ids=[free[0]])
    assert len(banned) == 8 and free[0] not in banned


def test_evaluate_gguf_scores_the_files_own_greedy_replies(tiny_gguf, tiny_tok):
    from lora_course.data import load_task, prompt_messages
    from lora_course.evaluate import MAX_NEW_TOKENS, score
    from lora_course.llama_runtime import evaluate_gguf, gguf_chat, load_gguf

    examples = load_task("technical", "eval")[:2]
    llm = load_gguf(tiny_gguf)
    result = evaluate_gguf(tiny_gguf, tiny_tok, "technical", examples, llm=llm)
    replies = gguf_chat(llm, tiny_tok, [prompt_messages(ex) for ex in examples], MAX_NEW_TOKENS["technical"])
    assert result.outputs == replies and result.task == "technical" and result.perplexity is None
    assert result.metrics == score("technical", replies, examples)


# ---------------------------------------------------------------------------------------------------- serving
def test_served_model_answers_within_max_tokens_and_stops_with_the_block(tiny_gguf):
    """llama_runtime.serve + chat_completion: the OpenAI-compatible server answers a chat completion within max_tokens
    on localhost, and is gone once the block ends (the port closed, a request refused)."""
    import socket
    import urllib.error

    from lora_course.llama_runtime import chat_completion, serve

    messages = [{"role": "user", "content": "Convert 3 km to m."}]
    with serve(tiny_gguf, n_threads=1, n_ctx=256) as url:
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        reply = chat_completion(url, messages, max_tokens=8)
        choice = reply["choices"][0]
        assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
        assert choice["finish_reason"] in ("stop", "length") and 0 < reply["usage"]["completion_tokens"] <= 8
        assert reply["usage"]["prompt_tokens"] > len(messages[0]["content"].split())  # the template was applied
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the server still listens after the with block"
    with pytest.raises(urllib.error.URLError):
        chat_completion(url, messages, timeout=2)


def test_serve_starts_exactly_server_command(tiny_gguf, monkeypatch):
    seen = []

    class Exited:  # a server process that died at once
        returncode = 1

        def poll(self):
            return 1

        def terminate(self):
            pass

        def wait(self, timeout=None):
            return 1

        def kill(self):
            pass

    def fake_popen(cmd, **kwargs):
        seen.append(cmd)
        return Exited()

    monkeypatch.setattr(llama_runtime.subprocess, "Popen", fake_popen)
    with pytest.raises(ExportError, match="exited with 1"), llama_runtime.serve(tiny_gguf, port=12345, n_threads=2):
        pass
    assert seen == [llama_runtime.server_command(tiny_gguf, 12345, 2)]
    cmd = seen[0]
    assert cmd[1:3] == ["-m", "llama_cpp.server"] and cmd[cmd.index("--host") + 1] == "127.0.0.1"


def test_probe_ggufs_keeps_the_file_another_process_finished_first(tmp_path, monkeypatch):
    """Two notebooks sharing a cache both found the probe files missing; the slower one's quantize then refused to
    overwrite the file the faster one had just renamed into place (OutputExistsError in notebook 00 on a GPU host).
    The finished file is whole (written under a temporary name, then renamed), so it is kept."""
    from lora_course.export import OutputExistsError

    monkeypatch.setenv("LORA_COURSE_CACHE", str(tmp_path))
    calls = []

    def other_process_won(src, out, *args, **kwargs):
        calls.append(out.name)
        out.write_bytes(b"GGUF from the other process")   # it renamed its complete file into place first
        raise OutputExistsError(f"{out} already exists: pass overwrite=True to replace it")

    monkeypatch.setattr(llama_runtime, "to_gguf", other_process_won)
    monkeypatch.setattr(llama_runtime, "quantize", other_process_won)
    paths = llama_runtime.probe_ggufs(("Q8_0", "Q4_K_M"))
    assert calls == ["tiny-f32.gguf", "tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf"]
    assert all(p.read_bytes() == b"GGUF from the other process" for p in paths.values())
    monkeypatch.setattr(llama_runtime, "quantize", lambda *a, **k: pytest.fail("rebuilt a complete probe file"))
    assert llama_runtime.probe_ggufs(("Q8_0", "Q4_K_M")) == paths
