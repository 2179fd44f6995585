"""A gRPC gateway in front of MLServer for labeld's remote-inference tests: TLS (optionally requiring a
client certificate) and a bearer token, as the gateway before a model server does in a real deployment
(MLServer itself speaks neither). Every call is forwarded as raw bytes to 127.0.0.1:UPSTREAM.

  gateway.py --listen PORT --upstream PORT [--cert F --key F [--client-ca F]] [--token-file F]
"""
import argparse
import concurrent.futures

import grpc

MAX = 100 << 20
p = argparse.ArgumentParser()
p.add_argument("--listen", type=int, required=True)
p.add_argument("--upstream", type=int, required=True)
p.add_argument("--cert")
p.add_argument("--key")
p.add_argument("--client-ca")
p.add_argument("--token-file")
a = p.parse_args()

options = [("grpc.max_send_message_length", MAX), ("grpc.max_receive_message_length", MAX)]
upstream = grpc.insecure_channel(f"127.0.0.1:{a.upstream}", options=options)
token = open(a.token_file).read().strip() if a.token_file else None


class Forward(grpc.GenericRpcHandler):
    def service(self, details):
        call = upstream.unary_unary(details.method)

        def handle(request, context):
            if token is not None and dict(context.invocation_metadata()).get("authorization") != f"Bearer {token}":
                context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
            # No deadline from the client shows as ~2^63 s, which the upstream call cannot take.
            remaining = context.time_remaining()
            try:
                return call(request, timeout=remaining if remaining < 3600 else None)
            except grpc.RpcError as e:
                context.abort(e.code(), e.details())

        return grpc.unary_unary_rpc_method_handler(handle)


server = grpc.server(concurrent.futures.ThreadPoolExecutor(8), handlers=[Forward()], options=options)
address = f"127.0.0.1:{a.listen}"
if a.cert:
    read = lambda f: open(f, "rb").read()
    ca = read(a.client_ca) if a.client_ca else None
    creds = grpc.ssl_server_credentials([(read(a.key), read(a.cert))], root_certificates=ca, require_client_auth=ca is not None)
    server.add_secure_port(address, creds)
else:
    server.add_insecure_port(address)
server.start()
print("gateway ready", flush=True)
server.wait_for_termination()
