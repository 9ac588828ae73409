"""Request/response with streamed replies: :class:`RpcServer`, :class:`RpcClient` and
what a handler sees and returns (:class:`Request`, :class:`Stream`, :class:`Deferred`)."""
from transport.rpc.client import ReplyStream, RpcClient
from transport.rpc.handlers import Deferred, Request, Stream
from transport.rpc.server import RpcServer

__all__ = ["Deferred", "ReplyStream", "Request", "RpcClient", "RpcServer", "Stream"]
