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
    """llama_runtime.serve + chat_completion: the OpenAI-compatible server answers a chat completion within max_tokens on
    localhost, and is gone once the block ends (the port closed, a request refused)."""
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
