"""chatcluster: a multi-core chat server for telnet and nc clients.

The package is split by what each module owns: pure protocol and chat rules
(`protocol`, `roster`, `chat`), the ZeroMQ bus (`bus`), the epoll loop of one
worker (`worker`), process management (`supervisor`), settings (`config`) and
the command line (`cli`).
"""

__version__ = "0.1.0"
