#!/usr/bin/env bash
# Regenerate fedforget/proto/*_pb2*.py from proto/fedforget/*.proto.
#
# Needs grpcio-tools from the dev extra (pip install -e ".[dev]"); its bundled
# protoc must match the protobuf runtime's major version (6.x here).
# Usage: scripts/generate_proto.sh [python]   (default: .venv/bin/python, else python3)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${1:-}"
if [[ -z "$python" ]]; then
  if [[ -x .venv/bin/python ]]; then python=.venv/bin/python; else python=python3; fi
fi

out=fedforget/proto
for proto in proto/fedforget/*.proto; do
  name="$(basename "$proto" .proto)"
  "$python" -m grpc_tools.protoc \
    --proto_path=proto/fedforget \
    --python_out="$out" \
    --pyi_out="$out" \
    --grpc_python_out="$out" \
    "$proto"
  # protoc writes "import withdrawal_pb2 as ..." (top-level); make it package-relative
  # so the code imports as fedforget.proto.withdrawal_pb2_grpc.
  sed -i -E "s/^import ${name}_pb2 as /from . import ${name}_pb2 as /" "$out/${name}_pb2_grpc.py"
done
echo "generated: $(ls "$out"/*_pb2*.py* | tr '\n' ' ')"
