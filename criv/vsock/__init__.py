"""criv's userspace vhost-user-vsock device backend and host-side vsock helpers.

The backend process (``python -m criv.vsock``) imports only the stdlib modules of this package;
keep heavyweight imports (grpc, asyncio users) out of this file.
"""
