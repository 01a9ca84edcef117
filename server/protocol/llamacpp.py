"""llama.cpp's native API: POST /completion (also /completions) and POST /infill bodies, and
the answers they get (`LlamaCppResult`). Not OpenAI's: llama.cpp's server's own, which its web
UI, editor plugins (llama.vim, llama.vscode) and many front ends speak.

The fields keep llama.cpp's names and defaults (temperature 0.8, top_k 40, top_p 0.95, min_p
0.05, repeat_last_n 64, n_predict -1: to the end of the context) and its sampler chain
(SamplingParams.temperature_last, penalty_last_n, and its other samplers in
SamplingParams.llamacpp: DRY, top-n-sigma, typical-p, XTC, the dynamic temperature,
min_keep, mirostat). What this server does not have (post-sampling probabilities, a slot
by id, per-request LoRA scales, progress events) is refused with a 400 naming it whenever a
request switches it on; left at llama.cpp's neutral value it is accepted, as it changes
nothing.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BeforeValidator, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from server.guided.spec import GuideSpec
from server.protocol.base import (
    MAX_ITEMS,
    MAX_ITEMS_FIELD,
    OpenAIBaseModel,
    RequestError,
    RequestLimits,
    ResponseModel,
    _check_count,
    _check_token_ids,
)
from server.protocol.requests import ChatMessage, ChatTemplateControls, check_stops
from server.request import MAX_LOGPROBS, Breakers, Dry, LlamaCppSamplers, SamplingParams

_UINT32_MAX = 2**32 - 1
_INT32_MAX = 2**31 - 1  # (llama.cpp's counts are int32s)
PromptPart = str | int  # a text, tokenized in place, or a token id
Prompt = list[PromptPart]
# llama.cpp's default chain, in the order it runs (common.h's)
SAMPLER_ORDER = ("penalties", "dry", "top_n_sigma", "top_k", "typ_p", "top_p", "min_p", "xtc",
                 "temperature")
# The most candidates the infill sampler takes (after top-k): it runs on the host
INFILL_TOP_K = 1024
# llama.cpp's default DRY sequence breakers (common.h's)
DRY_BREAKERS = ["\n", ":", "\"", "*"]
DRY_MAX_BREAKERS = 64  # (llama.cpp has no limit; a few are usual)
_SAMPLER_NAMES = {  # llama.cpp's names and alternative names
    "penalties": "penalties", "dry": "dry", "top_n_sigma": "top_n_sigma",
    "top_k": "top_k", "top-k": "top_k", "typ_p": "typ_p", "typ-p": "typ_p", "typ": "typ_p",
    "typical_p": "typ_p", "typical-p": "typ_p", "typical": "typ_p", "top_p": "top_p",
    "top-p": "top_p", "nucleus": "top_p", "min_p": "min_p", "min-p": "min_p", "xtc": "xtc",
    "temperature": "temperature", "temp": "temperature", "infill": "infill",
}
# llama.cpp's one-letter names (--sampling-seq)
_SAMPLER_CHARS = {"e": "penalties", "d": "dry", "s": "top_n_sigma", "k": "top_k",
                  "y": "typ_p", "p": "top_p", "m": "min_p", "x": "xtc", "t": "temperature",
                  "i": "infill"}


def _is_token_id(value: Any) -> bool:
    return type(value) is int and value >= 0


def _one_prompt(value: Any, where: str) -> Prompt:
    """A text, token ids, or token ids and texts mixed: the parts of one prompt."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        if value.get("multimodal_data"):
            raise ValueError(f"{where}: multimodal prompts are not supported (a text model)")
        text = value.get("prompt_string")
        if not isinstance(text, str):
            raise ValueError(f"{where}: an object prompt needs a string prompt_string")
        return [text]
    if isinstance(value, list) and value:
        for i, part in enumerate(value):
            if not (isinstance(part, str) or _is_token_id(part)):
                raise ValueError(f"{where}[{i}]: each part of a prompt must be a token id "
                                 "(an integer >= 0) or a string")
        return list(value)
    raise ValueError(f"{where} must be a string, or a non-empty list of token ids and "
                     "strings" + (", or a list of such prompts" if where == "prompt" else ""))


def one_prompt(where: str) -> Any:
    """A validator of one prompt's field (/tokenize's llama.cpp `content`)."""
    return lambda value: _one_prompt(value, where)


def _prompts(value: Any) -> list[Prompt]:
    """llama.cpp's prompt forms: one prompt (a text; token ids, texts among them or not), or,
    a list without a bare token id, one prompt per item."""
    if isinstance(value, list):
        if not value:
            raise ValueError("prompt must not be empty")
        if any(isinstance(part, int) for part in value):  # (a bool is an int: refused there)
            return [_one_prompt(value, "prompt")]  # (token ids: as long as a context)
        if len(value) > MAX_ITEMS:
            raise ValueError(f"at most {MAX_ITEMS} prompts allowed, got {len(value)}")
        return [_one_prompt(item, f"prompt[{i}]") for i, item in enumerate(value)]
    return [_one_prompt(value, "prompt")]


def _pairs(value: Any) -> Any:
    """logit_bias as [key, bias] pairs: llama.cpp takes pairs or an object {key: bias}."""
    if isinstance(value, dict):
        return [[key, bias] for key, bias in value.items()]
    return value


def _bias(value: Any) -> float:
    if value is False:  # llama.cpp's: the token never comes
        return float("-inf")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(
            value):
        raise ValueError("a bias must be a finite number, or false to ban the token")
    return float(value)


def _bias_entries(value: Any) -> list[tuple[int | str, float]]:
    if not isinstance(value, list):
        raise ValueError("must be a list of [token, bias] pairs or an object {token: bias}")
    if len(value) > MAX_ITEMS:
        raise ValueError(f"at most {MAX_ITEMS} entries allowed, got {len(value)}")
    entries: list[tuple[int | str, float]] = []
    for i, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2):
            raise ValueError(f"entry {i} must be a [token, bias] pair")
        key, bias = pair
        if isinstance(key, str) and key.lstrip("-").isdigit() and len(key) < 19:
            key = int(key)  # an object's keys are strings; an integer's is an id
        if not (_is_token_id(key) or (isinstance(key, str) and key)):
            raise ValueError(f"entry {i}: the token must be an id (an integer >= 0) or a "
                             "non-empty string (each of its tokens biased)")
        try:
            entries.append((key, _bias(bias)))
        except ValueError as e:
            raise ValueError(f"entry {i}: {e}") from None
    return entries


LogitBias = Annotated[list[tuple[int | str, Annotated[float, Field(allow_inf_nan=True)]]],
                      BeforeValidator(lambda v: _bias_entries(_pairs(v)))]


def _sampler_names(value: Any) -> list[str]:
    """llama.cpp's `samplers`: a list of names, or a string of their letters ("kpmt")."""
    if isinstance(value, str):
        unknown = sorted(set(value) - set(_SAMPLER_CHARS))
        if unknown:
            raise ValueError(f"unknown sampler letters {unknown}; llama.cpp's letters are "
                             f"{''.join(_SAMPLER_CHARS)}")
        return [_SAMPLER_CHARS[c] for c in value]
    if not isinstance(value, list) or not all(isinstance(name, str) for name in value):
        raise ValueError("must be a list of sampler names, or a string of their letters")
    unknown = [name for name in value if name not in _SAMPLER_NAMES]
    if unknown:
        raise ValueError(f"unknown samplers {unknown}; this server runs "
                         f"{[*SAMPLER_ORDER, 'infill']}")
    return [_SAMPLER_NAMES[name] for name in value]


class LlamaCppCompletionRequest(OpenAIBaseModel):
    """POST /completion (llama.cpp's native completion). See the module's docstring."""

    prompt: Annotated[list[Prompt], BeforeValidator(_prompts)]
    model: str | None = None  # ignored unless it names a LoRA adapter, as llama.cpp ignores it
    n_predict: int | None = Field(None, validation_alias=AliasChoices(
        "n_predict", "max_tokens", "max_completion_tokens"))  # -1 or None: to the context
    temperature: float = 0.8  # <= 0: greedy
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # >= 1: off
    min_p: float = 0.05  # <= 0: off
    repeat_penalty: float = Field(1.0, gt=0.0)
    repeat_last_n: int = Field(64, ge=-1)  # 0: penalties off; -1: the whole context
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: Annotated[list[str], MAX_ITEMS_FIELD] | str = []
    seed: int = Field(-1, ge=-1, le=_UINT32_MAX)  # -1 (or 2**32 - 1): random
    ignore_eos: bool = False
    logit_bias: LogitBias = []
    n_probs: int = Field(0, ge=0, le=MAX_LOGPROBS,
                         validation_alias=AliasChoices("n_probs", "logprobs"))
    stream: bool = False
    return_tokens: bool = False
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    n_cmpl: int = Field(1, ge=1, validation_alias=AliasChoices("n_cmpl", "n"))
    samplers: Annotated[list[str], BeforeValidator(_sampler_names)] | None = None
    response_fields: Annotated[list[str], MAX_ITEMS_FIELD] | None = None
    timings_per_token: bool = False
    # The editor plugins' limits (server/line_limits.py); <= 0: off. (Their t_max_prompt_ms
    # is ignored, as llama.cpp ignores it.)
    n_indent: int = 0
    t_max_predict_ms: int = 0
    # Accepted as llama.cpp's defaults run them: the prefix cache is the server's
    # (--enable-prefix-caching); nothing shifts the context, so n_keep and n_discard never act
    cache_prompt: bool = True
    n_keep: int = 0
    n_discard: int = 0
    # llama.cpp's other samplers (server/sampling_llamacpp.py, server/sampling_dry.py), its
    # defaults: off
    typical_p: float = 1.0  # >= 1: off
    top_n_sigma: float = -1.0  # <= 0: off
    xtc_probability: float = 0.0  # <= 0: off
    xtc_threshold: float = 0.1  # > 0.5: off
    dynatemp_range: float = 0.0  # <= 0: off
    dynatemp_exponent: float = 1.0
    min_keep: int = Field(0, ge=0, le=_INT32_MAX)  # the fewest top-p, min-p, typical-p,
    # XTC leave
    mirostat: Literal[0, 1, 2] = 0  # 1, 2: that version in place of the chain
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry_multiplier: float = 0.0  # 0: off
    dry_base: float = 1.75  # below 1: 1.75, as llama.cpp takes it
    dry_allowed_length: int = Field(2, ge=0, le=_INT32_MAX)
    dry_penalty_last_n: int = Field(-1, ge=-1, le=_INT32_MAX)  # -1: the context; 0: off
    dry_sequence_breakers: list[str] = Field(  # (each looked for in the whole vocabulary)
        default_factory=lambda: list(DRY_BREAKERS), min_length=1, max_length=DRY_MAX_BREAKERS)
    # llama.cpp's that this server does not have: accepted at their neutral values only (left
    # out of the OpenAPI schema, as requests.Refused fields are)
    id_slot: SkipJsonSchema[int] = -1
    post_sampling_probs: SkipJsonSchema[bool] = False
    return_progress: SkipJsonSchema[bool] = False
    lora: SkipJsonSchema[list[Any] | None] = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: list[str] | str) -> list[str]:
        stops = [value] if isinstance(value, str) else value
        return [s for s in stops if s]  # llama.cpp drops empty stop strings

    def _check_supported(self) -> None:
        """A sampler or option this server lacks is refused once a request switches it on."""
        on = {
            "id_slot": self.id_slot != -1,
            "post_sampling_probs": self.post_sampling_probs,
            "return_progress": self.return_progress,
            "lora": bool(self.lora),
        }
        for name, asked in on.items():
            if asked:
                raise RequestError(f"{name} is not supported by this server", name)
        if self.n_predict is not None and self.n_predict < -1:
            raise RequestError("n_predict must be -1 (to the end of the context) or >= 0",
                               "n_predict")
        self.chain  # noqa: B018 (refuses a chain in another order)

    @property
    def chain(self) -> tuple[str, ...]:
        """The samplers that run, in llama.cpp's order, the infill sampler (code completion's)
        last where named; a list in another order is refused."""
        if self.samplers is None:
            return SAMPLER_ORDER
        wanted = [name for name in self.samplers if name in (*SAMPLER_ORDER, "infill")]
        if len(set(wanted)) != len(wanted) or wanted != sorted(
                wanted, key=(*SAMPLER_ORDER, "infill").index):
            raise RequestError(f"samplers: this server runs them in llama.cpp's default order "
                               f"{list(SAMPLER_ORDER)} (any of them left out), \"infill\" "
                               f"last where named, got {self.samplers}", "samplers")
        if "infill" in wanted and not ("top_k" in wanted and 0 < self.top_k <= INFILL_TOP_K):
            # (its pass over the candidates runs on the host, in Python: a whole vocabulary
            # would hold up every request in the batch)
            raise RequestError(f"samplers: the infill sampler needs top_k (1 to "
                               f"{INFILL_TOP_K}) before it, as llama.vim and llama.vscode "
                               f"send it (top_k 40)", "samplers")
        return tuple(wanted)

    def guide_spec(self) -> GuideSpec | None:
        """The grammar, else the JSON schema (llama.cpp ignores the schema beside a grammar)."""
        if self.grammar:  # (llama.cpp's clients send "" for none)
            return GuideSpec("grammar", self.grammar, "grammar")
        if self.json_schema is not None:
            return GuideSpec("json", self.json_schema, "json_schema")
        return None

    @property
    def max_tokens(self) -> int | None:
        return None if self.n_predict is None or self.n_predict < 0 else self.n_predict

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None:
        """Raise `RequestError` where the request exceeds `limits` or the vocabulary, or asks
        for what this server lacks."""
        self._check_supported()
        _check_count(len(self.prompt), limits.max_prompts, "prompt")
        _check_count(self.n_cmpl, limits.max_n, "n_cmpl")
        check_stops(self.stop, limits)
        _check_count(len(self.logit_bias), limits.max_logit_bias, "logit_bias")
        _check_token_ids((key for key, _ in self.logit_bias if isinstance(key, int)),
                         vocab_size, "logit_bias")
        for prompt in self.prompt:
            _check_token_ids((part for part in prompt if isinstance(part, int)), vocab_size,
                             "prompt")

    @property
    def dry_on(self) -> bool:
        """Whether DRY runs (llama.cpp's test; mirostat replaces the whole chain)."""
        return (self.dry_multiplier != 0.0 and self.dry_penalty_last_n != 0
                and "dry" in self.chain and not self.mirostat)

    def other_samplers(self, max_model_len: int,
                             dry_breakers: Breakers) -> LlamaCppSamplers | None:
        """llama.cpp's other samplers as the chain runs them (None: all off), DRY with its
        breakers found in the vocabulary (LlamaCppService.dry_breakers)."""
        chain = self.chain
        samplers = LlamaCppSamplers(
            top_n_sigma=self.top_n_sigma if "top_n_sigma" in chain else -1.0,
            typical_p=self.typical_p if "typ_p" in chain else 1.0,
            min_keep=self.min_keep,
            xtc_probability=self.xtc_probability if "xtc" in chain else 0.0,
            xtc_threshold=self.xtc_threshold,
            dynatemp_range=self.dynatemp_range if "temperature" in chain else 0.0,
            dynatemp_exponent=self.dynatemp_exponent,
            mirostat=self.mirostat, mirostat_tau=self.mirostat_tau,
            mirostat_eta=self.mirostat_eta,
            dry=Dry(self.dry_multiplier, self.dry_base if self.dry_base >= 1.0 else 1.75,
                    self.dry_allowed_length,
                    max_model_len if self.dry_penalty_last_n == -1 else self.dry_penalty_last_n,
                    dry_breakers, tuple(self.dry_sequence_breakers)) if self.dry_on else None)
        if self.mirostat:
            return samplers
        return samplers if samplers.filters or samplers.dry else None

    def to_sampling_params(self, logit_bias: tuple[tuple[int, float], ...],
                           max_model_len: int,
                           dry_breakers: Breakers = ()) -> SamplingParams:
        """The engine's parameters, llama.cpp's chain: the samplers `chain` leaves out are
        off (temperature left out: 1), the penalties count the last repeat_last_n tokens;
        with mirostat, the temperature and mirostat alone (llama.cpp's common_sampler)."""
        common = SamplingParams(
            n=self.n_cmpl, max_tokens=self.max_tokens,
            temperature=max(self.temperature, 0.0), temperature_last=True,
            n_indent=max(self.n_indent, 0), t_max_predict_ms=max(self.t_max_predict_ms, 0),
            logit_bias=logit_bias,
            seed=None if self.seed in (-1, _UINT32_MAX) else self.seed,
            stop=tuple(self.stop), ignore_eos=self.ignore_eos,
            logprobs=self.n_probs or None,
            llamacpp=self.other_samplers(max_model_len, dry_breakers))
        if self.mirostat:
            return common
        chain = self.chain
        penalties = "penalties" in chain and self.repeat_last_n != 0
        window = max_model_len if self.repeat_last_n == -1 else self.repeat_last_n
        return replace(
            common,
            temperature=common.temperature if "temperature" in chain else 1.0,
            top_k=max(self.top_k, 0) if "top_k" in chain else 0,
            # top_p <= 0 keeps the likeliest token alone, as llama.cpp's does
            top_p=min(max(self.top_p, 1e-9), 1.0) if "top_p" in chain else 1.0,
            min_p=min(max(self.min_p, 0.0), 1.0) if "min_p" in chain else 0.0,
            repetition_penalty=self.repeat_penalty if penalties else 1.0,
            presence_penalty=self.presence_penalty if penalties else 0.0,
            frequency_penalty=self.frequency_penalty if penalties else 0.0,
            penalty_last_n=window if penalties else None,
            infill_sampler="infill" in chain,
        )

    def settings(self, params: SamplingParams) -> dict[str, Any]:
        """llama.cpp's `generation_settings`: the parameters the request ran with, as it gave
        them (the samplers left out of the chain, or all of it under mirostat, ran neutral:
        `slot_settings` shows what ran)."""
        return {
            **slot_settings(params),
            "temperature": self.temperature, "dynatemp_range": self.dynatemp_range,
            "dynatemp_exponent": self.dynatemp_exponent,
            "top_k": self.top_k, "top_p": self.top_p, "min_p": self.min_p,
            "top_n_sigma": self.top_n_sigma, "xtc_probability": self.xtc_probability,
            "xtc_threshold": self.xtc_threshold,
            "typical_p": self.typical_p, "repeat_last_n": self.repeat_last_n,
            "dry_multiplier": self.dry_multiplier,
            "dry_base": self.dry_base if self.dry_base >= 1.0 else 1.75,
            "dry_allowed_length": self.dry_allowed_length,
            "dry_penalty_last_n": self.dry_penalty_last_n,
            "dry_sequence_breakers": list(self.dry_sequence_breakers),
            "mirostat": self.mirostat, "mirostat_tau": self.mirostat_tau,
            "mirostat_eta": self.mirostat_eta,
            "max_tokens": -1 if self.max_tokens is None else self.max_tokens,
            "n_predict": -1 if self.max_tokens is None else self.max_tokens,
            "n_keep": self.n_keep, "n_discard": self.n_discard, "stream": self.stream,
            "n_probs": self.n_probs, "min_keep": self.min_keep,
            "grammar": self.grammar or "", "samplers": list(self.chain),
            "timings_per_token": self.timings_per_token,
        }


def slot_settings(params: SamplingParams) -> dict[str, Any]:
    """llama.cpp's generation settings of what a slot runs, from the engine's parameters of
    any request (its own API's, OpenAI's): the samplers as they run, neutral where off."""
    other = params.llamacpp or LlamaCppSamplers()
    dry = other.dry
    penalties = (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
                 or params.frequency_penalty != 0.0)
    running = {
        "penalties": penalties, "dry": dry is not None, "top_n_sigma": other.top_n_sigma > 0,
        "top_k": params.top_k > 0, "typ_p": other.typical_p < 1.0, "top_p": params.top_p < 1.0,
        "min_p": params.min_p > 0.0, "xtc": other.xtc_on, "temperature": True,
        "infill": params.infill_sampler,
    }
    max_tokens = -1 if params.max_tokens is None else params.max_tokens
    return {
        "seed": _UINT32_MAX if params.seed is None else params.seed,
        "temperature": params.temperature, "dynatemp_range": other.dynatemp_range,
        "dynatemp_exponent": other.dynatemp_exponent,
        "top_k": params.top_k, "top_p": params.top_p, "min_p": params.min_p,
        "top_n_sigma": other.top_n_sigma, "xtc_probability": other.xtc_probability,
        "xtc_threshold": other.xtc_threshold, "typical_p": other.typical_p,
        # (vLLM's penalties, without a window: over the whole context)
        "repeat_last_n": -1 if params.penalty_last_n is None else params.penalty_last_n,
        "repeat_penalty": params.repetition_penalty,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "dry_multiplier": 0.0 if dry is None else dry.multiplier,
        "dry_base": 1.75 if dry is None else dry.base,
        "dry_allowed_length": 2 if dry is None else dry.allowed_length,
        "dry_penalty_last_n": -1 if dry is None else dry.last_n,
        "dry_sequence_breakers": list(DRY_BREAKERS if dry is None else dry.texts),
        "mirostat": other.mirostat, "mirostat_tau": other.mirostat_tau,
        "mirostat_eta": other.mirostat_eta, "stop": list(params.stop),
        "max_tokens": max_tokens, "n_predict": max_tokens, "n_keep": 0, "n_discard": 0,
        "ignore_eos": params.ignore_eos, "stream": True,
        # (a ban's -inf is no JSON number: null, as llama.cpp's JSON writes it)
        "logit_bias": [{"bias": bias if math.isfinite(bias) else None, "token": token}
                       for token, bias in params.logit_bias],
        "n_probs": params.logprobs or 0, "min_keep": other.min_keep, "grammar": "",
        "samplers": [name for name, on in running.items() if on],
        "timings_per_token": False, "post_sampling_probs": False,
        "n_indent": params.n_indent, "t_max_predict_ms": params.t_max_predict_ms,
        "lora": [],
    }


class InfillExtra(OpenAIBaseModel):
    """A chunk of context from another file (llama.cpp's input_extra)."""

    filename: str = "tmp"
    text: str


class LlamaCppInfillRequest(LlamaCppCompletionRequest):
    """POST /infill: the code before and after the gap, llama.cpp's fill in the middle. The
    `prompt` continues the prefix (the text already typed in the gap)."""

    prompt: Annotated[list[Prompt], BeforeValidator(_prompts)] = [[""]]
    input_prefix: str
    input_suffix: str
    input_extra: Annotated[list[InfillExtra], MAX_ITEMS_FIELD] = []

    @field_validator("prompt")
    @classmethod
    def _one_text(cls, value: list[Prompt]) -> list[Prompt]:
        if len(value) != 1 or not all(isinstance(part, str) for part in value[0]):
            raise ValueError("an infill's prompt must be one text (what is typed in the gap)")
        return value


class Timings(ResponseModel):
    """llama.cpp's per-request timings. prompt_ms runs from the request's arrival to its first
    token (a wait in the queue counts), predicted_ms from there to the last."""

    cache_n: int
    prompt_n: int
    prompt_ms: float
    prompt_per_token_ms: float
    prompt_per_second: float
    predicted_n: int
    predicted_ms: float
    predicted_per_token_ms: float
    predicted_per_second: float

    @classmethod
    def of(cls, cache_n: int, prompt_n: int, prompt_s: float, predicted_n: int,
           predicted_s: float) -> Timings:
        prompt_ms, predicted_ms = prompt_s * 1e3, predicted_s * 1e3
        return cls(
            cache_n=cache_n, prompt_n=prompt_n, prompt_ms=prompt_ms,
            prompt_per_token_ms=prompt_ms / prompt_n if prompt_n else 0.0,
            prompt_per_second=prompt_n / prompt_s if prompt_s > 0 else 0.0,
            predicted_n=predicted_n, predicted_ms=predicted_ms,
            predicted_per_token_ms=predicted_ms / predicted_n if predicted_n else 0.0,
            predicted_per_second=predicted_n / predicted_s if predicted_s > 0 else 0.0)


class TokenProb(ResponseModel):
    id: int
    token: str
    bytes: list[int]
    logprob: float


class TokenProbs(TokenProb):
    """One generated token's entry of completion_probabilities: its logprob and its n_probs
    likeliest alternatives, of the model's raw distribution."""

    top_logprobs: list[TokenProb]


class LlamaCppResult(ResponseModel):
    """One prompt's (and sample's) answer, llama.cpp's fields in its order; a stream's last
    event too (content and tokens then empty: they were streamed)."""

    index: int
    content: str
    tokens: list[int]
    id_slot: int
    stop: bool
    model: str
    tokens_predicted: int
    tokens_evaluated: int
    generation_settings: dict[str, Any]
    prompt: str
    has_new_line: bool
    truncated: bool
    stop_type: str  # "eos", "word" (a stop string), "limit" (n_predict or the context)
    stopping_word: str
    tokens_cached: int
    timings: Timings
    completion_probabilities: list[TokenProbs] | None = None


def select_fields(result: dict[str, Any], fields: list[str]) -> dict[str, Any]:
    """llama.cpp's response_fields: only those, a nested one ("timings/prompt_n") under its
    path as the key; missing ones left out."""
    out: dict[str, Any] = {}
    for path in fields:
        value: Any = result
        for key in path.split("/"):
            if not isinstance(value, dict) or key not in value:
                break
            value = value[key]
        else:
            out[path] = value
    return out


class LlamaCppEmbeddingRequest(OpenAIBaseModel):
    """llama.cpp's POST /embedding: `content` (or `input`), its prompt forms; each prompt's
    vector normalized as `embd_normalize` says (2: L2, the default; 0: its largest
    magnitude scaled to 32760, int16's range; 1: taxicab; p > 2: the p-norm)."""

    content: Annotated[list[Prompt], BeforeValidator(_prompts)] = Field(
        validation_alias=AliasChoices("content", "input"))
    embd_normalize: int = 2
    model: str | None = None

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None:
        _check_count(len(self.content), limits.max_prompts, "content")
        for prompt in self.content:
            _check_token_ids((part for part in prompt if isinstance(part, int)), vocab_size,
                             "content")
        if self.embd_normalize < 0:  # (this server pools at unit length: no raw vectors)
            raise RequestError("embd_normalize -1 (no normalization) is not supported by "
                               "this server: its vectors come normalized", "embd_normalize")


def normalized(vector: list[float], norm: int) -> list[float]:
    """A unit-length vector under llama.cpp's embd_normalize (its direction is all that a
    normalization keeps, so any of them can be made from it)."""
    if norm == 2:
        return vector
    if norm == 0:
        scale = max((abs(x) for x in vector), default=0.0) / 32760.0
    else:
        scale = sum(abs(x) ** norm for x in vector) ** (1.0 / norm)
    return [x / scale for x in vector] if scale > 0 else [0.0] * len(vector)


class ApplyTemplateRequest(ChatTemplateControls):
    """llama.cpp's POST /apply-template: the prompt chat `messages` make, as text."""

    messages: Annotated[list[ChatMessage], Field(min_length=1), MAX_ITEMS_FIELD]
    model: str | None = None

    def check_limits(self, limits: RequestLimits, vocab_size: int,
                     max_model_len: int) -> None:
        _check_count(len(self.messages), limits.max_messages, "messages")
