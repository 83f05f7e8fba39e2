"""Why a model did not load from the Hugging Face hub, and what to do: gated, private or missing repos, tokens.

transformers turns every hub failure into an ``OSError`` whose message is written for library users ("pass
``token=<your_token>``"). ``explain_load_error`` reads the huggingface_hub error underneath (``GatedRepoError``,
``RepositoryNotFoundError``, an HTTP 401 for a rejected token, offline mode) and says, for a learner on Colab,
Kaggle or their own machine, which step of the token flow is missing (``notebook.gated_models_markdown`` has the
whole flow). How the hub answers, read from ``huggingface_hub.utils._http.hf_raise_for_status``: a gated repo
answers 401 to a request without a token and 403 to a token whose account has no access, both with
``X-Error-Code: GatedRepo``; a private or missing repo answers ``RepoNotFound``; a token the hub does not know
answers 401 "Invalid credentials in Authorization header".
"""
from __future__ import annotations

import os
import sys

TOKEN_PAGE = "https://huggingface.co/settings/tokens"


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def token_found() -> bool:
    """Whether huggingface_hub finds a token here (``HF_TOKEN``, ``hf auth login``'s file, Colab's secret)."""
    try:
        from huggingface_hub import get_token
    except ImportError:
        return bool(os.environ.get("HF_TOKEN"))
    try:
        return get_token() is not None
    except Exception:  # noqa: BLE001 - a broken secret store means: no usable token
        return False


def how_to_give_a_token() -> str:
    """Where this runtime takes a token from, in one sentence for the platform the code runs on."""
    if "google.colab" in sys.modules:
        return ("on Colab add a secret named HF_TOKEN (the key icon in the left bar) with the token as its value "
                "and switch on its notebook access")
    if "KAGGLE_KERNEL_RUN_TYPE" in os.environ:
        return ("on Kaggle add a secret HF_TOKEN (Add-ons > Secrets), attach it to this notebook and run "
                "`from kaggle_secrets import UserSecretsClient; import os; "
                "os.environ['HF_TOKEN'] = UserSecretsClient().get_secret('HF_TOKEN')` before loading")
    return "run `hf auth login` once, or set HF_TOKEN in the environment before starting Python"


def explain_load_error(source: str, exc: BaseException) -> str | None:
    """A message saying why ``source`` did not load from the hub and what to do; None if ``exc`` is not a hub error.

    Meant for ``except OSError as e: raise ModelSourceError(explain_load_error(source, e) or ...) from e``.
    """
    try:
        from huggingface_hub import errors as hub_errors
    except ImportError:
        return None
    page = f"https://huggingface.co/{source}"
    give = how_to_give_a_token()
    has_token = token_found()
    for e in _chain(exc):
        if isinstance(e, hub_errors.GatedRepoError):
            if _status(e) == 401 or not has_token:
                return (f"{source} is a gated model and this runtime sent no Hugging Face token. Accept its licence "
                        f"at {page} (logged in), create a read token at {TOKEN_PAGE}, then {give}. "
                        "Or choose an open model (MODEL_ID), e.g. the course's default SmolLM2.")
            return (f"{source} is a gated model and your token's account has no access to it (yet). Open {page} "
                    "while logged in to that account, accept the licence and wait until access is granted (some "
                    "authors review requests); the token itself was accepted.")
        if isinstance(e, hub_errors.RepositoryNotFoundError):
            where = "" if has_token else (" If it is private or gated, this runtime sent no token: create one at "
                                          f"{TOKEN_PAGE}, then {give}.")
            return (f"{source} was not found on the hub: check the id (owner/name, exact spelling) at {page}."
                    + where + (" If it is private, your token's account needs access to it." if has_token else ""))
        if isinstance(e, hub_errors.HfHubHTTPError) and _status(e) == 401:
            return (f"the hub rejected the Hugging Face token this runtime sent while loading {source} (HTTP 401: "
                    f"invalid credentials). Create a new read token at {TOKEN_PAGE} and replace the old one: {give}.")
        if isinstance(e, (hub_errors.OfflineModeIsEnabled, hub_errors.LocalEntryNotFoundError)):
            return (f"{source} is not in the local Hugging Face cache and the hub cannot be reached (no network, or "
                    "HF_HUB_OFFLINE=1 is set). Go online once to download it, or use a local folder or the "
                    "`cpu`/`tiny` profiles, which need no network.")
    return None
