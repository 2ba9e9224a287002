#!/usr/bin/env python3
"""Push an image to a registry over plain HTTP, streaming its layers from disk.

bench_push.py REGISTRY REPO TAG LAYER.tar.gz:DIFFID [...]   one image
bench_push.py --many REGISTRY REPO COUNT LAYER.tar.gz:DIFFID  COUNT images (tags i0..), one config each
bench_push.py --small-files-tar OUT.tar COUNT                 a tar of COUNT small files from /usr
"""
import hashlib
import http.client
import json
import os
import platform
import sys

ARCH = {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def request(registry, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(registry, timeout=600)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    if resp.status >= 300:
        sys.exit(f"{method} {path}: {resp.status} {data[:200]!r}")
    return resp, data


def blob_exists(registry, repo, digest):
    conn = http.client.HTTPConnection(registry, timeout=60)
    conn.request("HEAD", f"/v2/{repo}/blobs/{digest}")
    ok = conn.getresponse().status == 200
    conn.close()
    return ok


def push_blob_file(registry, repo, path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    size = os.path.getsize(path)
    if not blob_exists(registry, repo, digest):
        resp, _ = request(registry, "POST", f"/v2/{repo}/blobs/uploads/")
        loc = resp.getheader("Location")
        loc = loc.split(registry, 1)[-1] if loc.startswith("http") else loc
        sep = "&" if "?" in loc else "?"
        with open(path, "rb") as f:
            request(registry, "PUT", f"{loc}{sep}digest={digest}", body=f,
                    headers={"Content-Length": str(size), "Content-Type": "application/octet-stream"})
    return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size}


def push_bytes(registry, repo, data, media_type):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    if not blob_exists(registry, repo, digest):
        resp, _ = request(registry, "POST", f"/v2/{repo}/blobs/uploads/")
        loc = resp.getheader("Location")
        loc = loc.split(registry, 1)[-1] if loc.startswith("http") else loc
        sep = "&" if "?" in loc else "?"
        request(registry, "PUT", f"{loc}{sep}digest={digest}", body=data,
                headers={"Content-Length": str(len(data)), "Content-Type": "application/octet-stream"})
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def push_image(registry, repo, tag, layers, diff_ids, extra=None):
    config = {"architecture": ARCH, "os": "linux", "config": {"Env": ["PATH=/usr/bin"]},
              "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    if extra:
        config["config"]["Labels"] = extra
    cdesc = push_bytes(registry, repo, json.dumps(config).encode(), "application/vnd.oci.image.config.v1+json")
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": cdesc, "layers": layers}
    mt = manifest["mediaType"]
    request(registry, "PUT", f"/v2/{repo}/manifests/{tag}", body=json.dumps(manifest).encode(),
            headers={"Content-Type": mt})


def main():
    args = sys.argv[1:]
    if args and args[0] == "--many":
        registry, repo, count, spec = args[1], args[2], int(args[3]), args[4]
        path, diff = spec.rsplit(":sha256:", 1)
        layer = push_blob_file(registry, repo, path)
        for i in range(count):
            push_image(registry, repo, f"i{i}", [layer], ["sha256:" + diff], {"bench.index": str(i)})
        return
    if args and args[0] == "--small-files-tar":
        # An uncompressed tar of at least COUNT small real files from /usr,
        # taken again under copy-N/ prefixes if the machine has fewer.
        import tarfile
        out, count = args[1], int(args[2])
        files = sorted(
            os.path.join(d, f)
            for d, _, fs in os.walk("/usr")
            for f in fs
            if os.path.isfile(os.path.join(d, f)) and not os.path.islink(os.path.join(d, f))
            and os.path.getsize(os.path.join(d, f)) < 32768
        )
        if not files:
            sys.exit("no small files under /usr")
        with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as tar:
            n, round_ = 0, 0
            while n < count:
                for f in files:
                    if n >= count:
                        break
                    name = f.lstrip("/") if round_ == 0 else f"copy-{round_}/{f.lstrip('/')}"
                    try:
                        tar.add(f, arcname=name, recursive=False)
                    except OSError:
                        continue
                    n += 1
                round_ += 1
        return
    registry, repo, tag, specs = args[0], args[1], args[2], args[3:]
    layers, diffs = [], []
    for spec in specs:
        path, diff = spec.rsplit(":sha256:", 1)
        layers.append(push_blob_file(registry, repo, path))
        diffs.append("sha256:" + diff)
    push_image(registry, repo, tag, layers, diffs)


if __name__ == "__main__":
    main()
