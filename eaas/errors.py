"""One error hierarchy for eaas. User input errors also derive from ValueError/TypeError."""

from __future__ import annotations


class EaasError(Exception):
    """Base class of every error eaas raises on purpose."""


# --- configuration and input -------------------------------------------------------------
class ConfigError(EaasError, ValueError):
    """A configuration field has a value that is not allowed (the message names the field)."""


class CheckpointError(EaasError, ValueError):
    """A checkpoint directory cannot be used (the message names the file and field/tensor)."""


class GraphError(EaasError, ValueError):
    """A dataflow graph is invalid (the message names the node, and the line when known)."""


class RequestError(EaasError, ValueError):
    """A request is invalid (bad prompt, bad sampling parameters, ...)."""


# --- actors ------------------------------------------------------------------------------
class ActorError(EaasError):
    """Base class of actor-runtime errors."""


class ActorDeadError(ActorError):
    """The target actor is stopped or crashed; pending and new asks fail with this."""


class AskTimeoutError(ActorError, TimeoutError):
    """An ask got no reply before its deadline."""


class MailboxFullError(ActorError):
    """A bounded mailbox stayed full past the tell timeout (backpressure)."""


class MailboxClosedError(ActorError):
    """The mailbox is closed; the actor is stopping or stopped."""


class ActorStateError(ActorError, RuntimeError):
    """An actor or system was used in a lifecycle state that does not allow it."""


class EscalationError(ActorError):
    """A supervisor's restart intensity was exceeded and the failure escalated."""


# --- transport and serving ---------------------------------------------------------------
class InjectedFault(EaasError):
    """A crash asked for (fault injection: the admin API's kill, `inject_fault`): planned, so
    supervisors log it as one line, without a traceback."""


class TransportError(EaasError, ConnectionError):
    """A transport connection failed or closed."""


class FrameError(TransportError):
    """A received frame was malformed, truncated or oversized; the connection is closed."""


class AuthError(TransportError):
    """A peer did not prove it holds the cluster secret (or none is configured): the
    connection is refused before any of its frames is read."""


class NoReplicaError(EaasError):
    """No live server hosts an expert a request needs (no-replica policy `fail`)."""


class RequestAbortedError(EaasError):
    """A request was aborted (by the caller, a deadline, or shutdown)."""


class RemoteError(EaasError):
    """A remote handler raised; `type_name` and `message` describe the peer's exception."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message


class EngineOverloadedError(EaasError):
    """The engine's waiting queue is full; retry later (HTTP 503 with a Retry-After header)."""


class StartTimeoutError(ActorError, TimeoutError):
    """An actor's `on_start` did not finish before the system's start timeout."""
