"""Plain values that cross the engine boundary: sampling parameters, request state, outputs.

No torch and no HTTP here: the API layer builds a `SamplingParams` and a `Request` (one
`Sequence` per sample, whose slot and tokens the scheduler keeps), the engine turns it into
`RequestOutput`s. Everything is a list of ints, a string or a number, so all of it can also
cross to an engine process.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from server.guided.spec import Guide

if TYPE_CHECKING:
    from model.lora import LoraAdapter

Pooling = Literal["last", "mean"]  # how an embedding pools the prompt's hidden states
MAX_LOGPROBS = 20
# Temperatures below this are greedy: dividing logits by a float32 subnormal overflows to inf.
GREEDY_TEMPERATURE = 1e-5


class FinishReason(enum.Enum):
    STOP = "stop"  # eos, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the slot's length limit
    ABORT = "abort"  # cancelled (client gone, shutdown)
    ERROR = "error"  # this request failed inside the engine


class RequestStatus(enum.IntEnum):
    """Ordered: everything after RUNNING is finished."""

    WAITING = 0
    RUNNING = 1
    FINISHED_STOPPED = 2
    FINISHED_LENGTH = 3
    FINISHED_ABORTED = 4
    FINISHED_ERROR = 5

    @property
    def is_finished(self) -> bool:
        return self > RequestStatus.RUNNING


@dataclass(frozen=True, slots=True)
class ThinkingState:
    """Where a budgeted thinking stands after the output's first `walked` tokens."""

    walked: int = 0
    used: int = 0  # thinking tokens so far
    opened: bool = False  # a start tag was written (the count starts again past it)
    ended: bool = False  # the end tag was written


@dataclass(frozen=True, slots=True)
class ThinkingBudget:
    """vLLM's thinking_token_budget: an answer that starts in its thinking thinks for at most
    `tokens` tokens; the next one is then `end_id`, forced. Counted as the usage's
    reasoning_tokens counts them (ChatService.reasoning_tokens): from past the first start
    tag the output writes, else its first token, to before the first end tag."""

    tokens: int
    start_id: int
    end_id: int

    def walk(self, output_ids: list[int], state: ThinkingState = ThinkingState()
             ) -> ThinkingState:
        """`state` walked on over the output's tokens past `state.walked`."""
        used, opened = state.used, state.opened
        for token_id in output_ids[state.walked:]:
            if token_id == self.end_id:
                return ThinkingState(len(output_ids), used, opened, True)
            if token_id == self.start_id and not opened:
                used, opened = 0, True
            else:
                used += 1
        return ThinkingState(len(output_ids), used, opened, state.ended)


# DRY's sequence breakers: each a head token and the tokens that must follow it (none: the
# head breaks alone)
Breakers = tuple[tuple[int, tuple[int, ...]], ...]


@dataclass(frozen=True, slots=True)
class Dry:
    """llama.cpp's DRY ("don't repeat yourself") penalty (server/sampling_dry.py): a token
    that would extend a repeat of `allowed_length` or more tokens of the last `last_n` loses
    multiplier * base ** (length - allowed_length) from its logit. A repeat does not reach
    back past a sequence breaker: each is a head token and the tokens that must follow it
    (none: the head alone breaks), found in the vocabulary's texts by the API layer."""

    multiplier: float
    base: float = 1.75
    allowed_length: int = 2
    last_n: int = 4096  # the tokens of prompt + output it looks back over
    breakers: Breakers = ()
    texts: tuple[str, ...] = ()  # the breakers as the request gave them (shown, not used)

    def __post_init__(self) -> None:
        if self.last_n < 1 or self.allowed_length < 0 or self.base < 1.0:
            raise ValueError("DRY needs last_n >= 1, allowed_length >= 0 and base >= 1")


@dataclass(frozen=True, slots=True)
class LlamaCppSamplers:
    """llama.cpp's samplers beyond top-k, top-p and min-p (its native API; neutral by
    default), in its chain's order: DRY after the penalties, top-n-sigma before top-k,
    typical-p between top-k and top-p, XTC after min-p, dynamic temperature as the
    temperature (server/sampling_llamacpp.py); or mirostat in place of the whole chain."""

    top_n_sigma: float = -1.0  # <= 0: off
    typical_p: float = 1.0  # >= 1: off
    min_keep: int = 0  # the fewest tokens top-p, min-p, typical-p and XTC leave
    xtc_probability: float = 0.0  # <= 0: off
    xtc_threshold: float = 0.1  # > 0.5: off
    dynatemp_range: float = 0.0  # <= 0: off
    dynatemp_exponent: float = 1.0
    mirostat: Literal[0, 1, 2] = 0  # 1 or 2: that version alone after the temperature
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry: Dry | None = None

    def __post_init__(self) -> None:
        if self.min_keep < 0 or self.mirostat not in (0, 1, 2):
            raise ValueError("min_keep must be >= 0 and mirostat 0, 1 or 2")

    @property
    def xtc_on(self) -> bool:
        """Whether XTC can drop tokens (a threshold above 0.5 leaves one token above it at
        most, which XTC keeps: llama.cpp's off switch)."""
        return self.xtc_probability > 0 and self.xtc_threshold <= 0.5

    @property
    def filters(self) -> bool:
        """Whether a filter of the chain, min_keep or the dynamic temperature is on (the
        rows then run llama.cpp's whole chain: server/sampling_llamacpp.py)."""
        return self.mirostat == 0 and (
            self.top_n_sigma > 0 or self.typical_p < 1.0 or self.dynatemp_range > 0
            or self.min_keep > 1 or self.xtc_on)

    @property
    def moves_argmax(self) -> bool:
        """Whether at temperature 0 the token can be another than the likeliest: typical-p
        and XTC may drop the likeliest, a dynamic temperature may be above 0 (llama.cpp's
        temperature 0 keeps the likeliest of what the chain left)."""
        return self.mirostat == 0 and (
            self.typical_p < 1.0 or self.dynatemp_range > 0 or self.xtc_on)


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Per-request decoding controls, with vLLM's meanings.

    `max_tokens=None` means "up to the slot's length limit", or `default_max_tokens` (the
    model's max_new_tokens) where the slot has room for it: vLLM takes the smaller of the two
    (never below min_tokens; `EngineFront.generate` fills it in). `logprobs` is the number of top
    alternatives returned beside the chosen token (0: the chosen token's logprob only; None: no
    logprobs). `prompt_logprobs` likewise for the prompt tokens (echo / scoring).
    """

    n: int = 1
    max_tokens: int | None = 16
    default_max_tokens: int | None = None
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    allowed_token_ids: tuple[int, ...] = ()  # vLLM's: sample only these (empty: any)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    guide: Guide | None = None  # guided decoding: what the output must follow
    # The token past whose first occurrence the guide starts (the reasoning's end under
    # --reasoning-parser, as vLLM applies structured outputs after the thinking); None: at once
    guide_after: int | None = None
    thinking_budget: ThinkingBudget | None = None  # (under --reasoning-parser)
    # An embedding request's (max_tokens 0): the prompt's final hidden states pooled, its
    # last token's or every token's mean, at unit length
    pooling: Pooling | None = None
    # vLLM's bad_words, as token sequences: a sequence's last token is banned where the
    # output ends with the others (a one-token word always)
    bad_words: tuple[tuple[int, ...], ...] = ()
    lora: str | None = None  # the LoRA adapter the request runs (--lora-modules); None: none
    # llama.cpp's sampler chain (its native /completion): top-k -> top-p -> min-p measured on
    # the logits before temperature, which comes last; False: vLLM's order (temperature
    # first, min-p before top-k/top-p)
    temperature_last: bool = False
    # llama.cpp's penalties: repetition, presence and frequency all count the last n tokens of
    # prompt + output; None: vLLM's (repetition over prompt + output, the others output only)
    penalty_last_n: int | None = None
    # llama.cpp's infill sampler runs last in the chain (server/sampling_infill.py)
    infill_sampler: bool = False
    # llama.cpp's editor limits (llama.vim, llama.vscode), 0: off. n_indent: past the first
    # line, a line indented by fewer spaces or tabs ends the output before its first other
    # character; t_max_predict_ms: once a line is complete, the output ends after this long
    # since its first token. Both end it as the length does ("length").
    n_indent: int = 0
    t_max_predict_ms: int = 0
    llamacpp: LlamaCppSamplers | None = None  # (None: all of them off)

    def max_tokens_within(self, room: int) -> int:
        """max_tokens, or where it is left to the context (None), vLLM's choice: the model's
        default where the `room` left holds it (never below min_tokens), else the room."""
        if self.max_tokens is not None:
            return self.max_tokens
        wanted = self.default_max_tokens
        return room if wanted is None else min(room, max(wanted, self.min_tokens))

    def __post_init__(self) -> None:
        # The API validates client input with clear messages; these guard internal callers.
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.max_tokens is not None and self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        if self.n_indent < 0 or self.t_max_predict_ms < 0:
            raise ValueError("n_indent and t_max_predict_ms must be >= 0 (0: off)")
        if self.llamacpp is not None and not self.temperature_last:
            raise ValueError("llama.cpp's samplers run in its chain (temperature_last)")
        if self.penalty_last_n is not None and self.penalty_last_n < 1:
            raise ValueError(f"penalty_last_n must be >= 1 or None, got {self.penalty_last_n}")
        if self.pooling is not None and (self.max_tokens != 0 or self.n != 1):
            raise ValueError("pooling is for prompt-only requests of one sample (max_tokens "
                             "0, n 1)")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

    @property
    def every_prompt_position(self) -> bool:
        """Whether every prompt token must be computed, none taken from the prefix cache:
        each has its logprobs, or its place in a mean."""
        return self.prompt_logprobs is not None or self.pooling == "mean"

    @property
    def scores_only(self) -> bool:
        """max_tokens 0: the prompt is scored (echo with logprobs), nothing is generated."""
        return self.max_tokens == 0

    @property
    def is_greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE and not (
            self.llamacpp is not None and self.llamacpp.moves_argmax)

    @property
    def mirostat(self) -> int:
        return 0 if self.llamacpp is None else self.llamacpp.mirostat

    @property
    def dry(self) -> Dry | None:
        return None if self.llamacpp is None else self.llamacpp.dry

    @property
    def bans_by_output(self) -> bool:
        """Whether what the sampler bans depends on the output's last tokens (a bad word of
        more than one token)."""
        return any(len(word) > 1 for word in self.bad_words)

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One position's logprob: the chosen token and its top alternatives (id, logprob); a
    prompt token's also its rank in the vocabulary (1: the likeliest), vLLM's
    prompt_logprobs show it."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None


@dataclass(slots=True)
class RequestOutput:
    """What one engine step produced for one sequence; posted to the request's stream.

    `text` and `token_ids` are the delta since the previous output; `finish_reason` is set on
    the last one. `prompt_logprobs` (one entry per prompt token) comes once, on the first
    output, when asked for.
    """

    request_id: str
    index: int  # which of the n samples
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    finish_reason: FinishReason | None = None
    # vLLM's: the stop string or stop_token_ids id that finished it (None for eos and others)
    stop_reason: str | int | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0  # cumulative
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache, not computed
    embedding: list[float] | None = None  # a pooling request's, on its final output

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Sequence:
    """One sample of a request: its slot, its tokens and how many of them the slot holds."""

    request: Request
    index: int
    slot: int = -1
    output_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprob] = field(default_factory=list)
    num_computed: int = 0  # tokens whose K/V are in the slot
    status: RequestStatus = RequestStatus.WAITING
    # What stopped it, as vLLM reports it: a stop string or a stop token id; None for the
    # tokenizer's eos (set by whoever finishes it with FINISHED_STOPPED)
    stop_reason: str | int | None = None
    last_token_time: float | None = None  # monotonic; for inter-token latency
    has_new_line: bool = False  # its text so far holds a newline (llama.cpp's /slots shows it)

    @property
    def num_tokens(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    @property
    def last_token(self) -> int:
        return self.output_ids[-1] if self.output_ids else self.request.prompt_ids[-1]

    def cached_tokens(self) -> list[int]:
        """The tokens whose K/V its slot holds: the first `num_computed` of prompt + output
        (the newest output token is not fed yet); a prompt still in prefill only in the first
        sample's slot (the others get their copy when it completes)."""
        request = self.request
        if request.num_prefilled < len(request.prompt_ids) or request.params.scores_only:
            # (a scored prompt is not copied to the other samples' slots)
            return request.prompt_ids[:request.num_prefilled] if self.index == 0 else []
        return (request.prompt_ids + self.output_ids)[:self.num_computed]


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    admitted_time: float | None = None
    num_prefilled: int = 0  # prompt tokens computed so far (shared by all samples)
    num_cached_tokens: int = 0  # of those, copied from the prefix cache at admission
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)
    seqs: list[Sequence] = field(default_factory=list)
    task_id: int = -1  # its number in the engine's order of arrival (llama.cpp's id_task)
    # The LoRA adapter params.lora names, taken by the engine with the request: one unloaded
    # later stays with the requests that run on it (set where the engine runs, never sent)
    adapter: LoraAdapter | None = None

    def __post_init__(self) -> None:
        if not self.seqs:
            self.seqs = [Sequence(self, i) for i in range(self.params.n)]

    @property
    def is_finished(self) -> bool:
        return all(s.status.is_finished for s in self.seqs)
