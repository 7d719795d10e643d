#!/usr/bin/env bash
# Copies the shared libraries the server binary loads into STAGING, each at its
# own absolute path (the binary's rpath names torch/lib; torch's libraries find
# the wheel's nvidia/*/lib through their $ORIGIN rpaths).
#
#   scripts/image/stage-libs.sh BINARY SITE_PACKAGES STAGING VARIANT
#
# VARIANT=cuda: all of torch/lib and the wheel's nvidia/ libraries (without
# headers and static archives): libtorch_cuda loads most of them on demand.
# VARIANT=cpu: only what the binary needs, and what those need in turn, found in
# torch/lib and nvidia/*/lib (a CUDA wheel's libtorch_cpu needs libcudart and
# libcupti and nothing else of nvidia/); the system's own libraries come from the
# runtime image. The binary must then be built with SPLITSERVE_LINK_CUDA=0, or it
# names libtorch_cuda and this stops. The binary also names libtorch.so (build.rs:
# AOTInductor packages need it loaded by that name), which in a CUDA wheel is an
# empty library that names libtorch_cuda and libtorch_cpu, and so would bring
# all of CUDA along: the CPU image gets an empty libtorch.so of its own instead,
# naming only libtorch_cpu and libc10, as the CPU-only wheel's is.
set -euo pipefail

bin=$1 site=$2 staging=$3 variant=$4
torch_lib="${site}/torch/lib"
mkdir -p "${staging}${torch_lib}"

if [ "${variant}" = cuda ]; then
  cp -a "${torch_lib}/." "${staging}${torch_lib}/"
  if [ -f "${torch_lib}/libtorch_cuda.so" ] && [ -d "${site}/nvidia" ]; then
    cp -a "${site}/nvidia" "${staging}${site}/nvidia"
    find "${staging}${site}/nvidia" -type d -name include -prune -exec rm -rf {} +
    find "${staging}${site}/nvidia" -type f -name '*.a' -delete
  fi
  exit 0
fi

if readelf -d "${bin}" | grep -q 'NEEDED.*\[libtorch_cuda'; then
  echo "stage-libs: ${bin} needs libtorch_cuda; build the CPU variant with SPLITSERVE_LINK_CUDA=0" >&2
  exit 1
fi
shopt -s nullglob
dirs=("${torch_lib}" "${site}"/nvidia/*/lib)
queue=("${bin}")
declare -A staged=()
# An empty libtorch.so naming libtorch_cpu and libc10, in the staging tree.
stub_libtorch() {
  local dir
  dir=$(mktemp -d)
  : >"${dir}/libtorch.c"
  ${CC:-cc} -shared -o "${staging}${torch_lib}/libtorch.so" "${dir}/libtorch.c" \
    -Wl,-soname,libtorch.so -Wl,--no-as-needed -L"${torch_lib}" -ltorch_cpu -lc10 -Wl,-rpath,'$ORIGIN'
  rm -rf "${dir}"
}
while [ "${#queue[@]}" -gt 0 ]; do
  file=${queue[0]}
  queue=("${queue[@]:1}")
  for need in $(readelf -d "${file}" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
    for dir in "${dirs[@]}"; do
      if [ -e "${dir}/${need}" ]; then
        if [ -z "${staged[${dir}/${need}]:-}" ]; then
          staged[${dir}/${need}]=1
          mkdir -p "${staging}${dir}"
          if [ "${dir}/${need}" = "${torch_lib}/libtorch.so" ] \
              && readelf -d "${dir}/${need}" | grep -q 'NEEDED.*\[libtorch_cuda'; then
            stub_libtorch
            queue+=("${staging}${dir}/${need}")
          else
            cp -L "${dir}/${need}" "${staging}${dir}/${need}"
            queue+=("${dir}/${need}")
          fi
        fi
        break
      fi
    done
  done
done
echo "stage-libs: ${#staged[@]} libraries for the CPU image:" >&2
printf '  %s\n' "${!staged[@]}" | sort >&2
