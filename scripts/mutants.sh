#!/usr/bin/env bash
# Mutation testing of the security- and lifecycle-critical modules with
# cargo-mutants (installed by `make mutants` into .tools/). Never part of
# `make test`: each mutant is one incremental release build plus the tests that
# claim the module, minutes each; docs/testing.md has the scores and the costs.
#
#   scripts/mutants.sh MODULE [cargo-mutants args...]
#   MODULE: auth | listen | layers | repository | checkpoint | v2
#   e.g. scripts/mutants.sh auth
#        scripts/mutants.sh listen --shard 0/8        # one eighth of listen.rs
#        scripts/mutants.sh auth -F 'Tokens::reload'  # the mutants of one function
#
# Mutants are applied in this tree (--in-place: the release build dir is reused
# and only splitserve recompiles). Do not edit the tree while it runs; an
# interrupted run restores the file it was mutating (cargo-mutants does on
# SIGINT), and `git diff src/` shows anything left. The report is written to
# mutants.out/MODULE/ (outcomes.json, caught.txt, missed.txt, timeout.txt, unviable.txt).
set -euo pipefail
cd "$(dirname "$0")/.."

module=${1:?usage: scripts/mutants.sh auth|listen|layers|repository|checkpoint|v2 [cargo-mutants args]}
shift

# Per module: the file(s) mutated, the Rust tests that claim them (cargo test
# name filters: unit tests by module path, integration tests by file), and the
# Python tests, run by tests/python_oracle.rs against the mutated binary (`+`
# stands for a space inside a -k expression).
case "$module" in
auth)
    files=(src/auth.rs)
    rust=(auth::)
    python="tests/python/test_security.py tests/python/test_v2.py tests/python/test_repository.py -k token+or+hash_inside+or+scope"
    ;;
listen)
    files=(src/listen.rs)
    rust=(listen:: limits::)
    python="tests/python/test_security.py tests/python/test_lifecycle.py -k tls+or+rotat+or+http+or+client_that+or+age"
    ;;
layers)
    files=(src/grpc/layers.rs)
    rust=(layers:: limits::)
    python="tests/python/test_security.py tests/python/test_json_bodies.py -k token+or+oversized+or+garbage+or+budget+or+share+or+stalled"
    ;;
repository)
    files=('src/repository/*.rs')
    rust=(repository::)
    python="tests/python/test_repository.py"
    ;;
checkpoint)
    files=(src/training/checkpoint.rs)
    rust=(checkpoint:: training::)
    python="tests/python/test_durable.py"
    ;;
v2)
    files=(src/v2.rs)
    rust=(v2::)
    # check_against_config runs for repository models only: the served-unchanged test
    # sends a repository model the requests its config.pbtxt rules out.
    python="tests/python/test_v2.py tests/python/test_json_bodies.py tests/python/test_repository.py::test_a_triton_repository_is_served_unchanged"
    ;;
*)
    echo "unknown module $module: auth, listen, layers, repository, checkpoint or v2" >&2
    exit 2
    ;;
esac

args=()
for f in "${files[@]}"; do args+=(--file "$f"); done
export SPLITSERVE_MUTANTS_PYTEST="$python"
mkdir -p "mutants.out/$module"
# In place, one mutant at a time: the mutants share this tree and its target/.
# The build timeout is absolute: the unmutated baseline builds in seconds when
# the tree is already built, so a multiple of it would time out every mutant's
# incremental release build (about a minute here).
exec .tools/bin/cargo-mutants mutants --in-place --no-shuffle --build-timeout 900 \
    --output "mutants.out/$module" "${args[@]}" "$@" \
    -- --lib --test integration \
    -- "${rust[@]}" python_oracle --include-ignored --test-threads 2
