"""A user-space NFSv3 server (ONC RPC, portmapper, MOUNT v3, NFSv3) over pluggable backends."""
