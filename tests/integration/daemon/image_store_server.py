"""A loopback HTTP image store for the daemon integration tests (Python 3 stdlib only).

The shared-store layout (DESIGN.md, "Image store"), the same for a directory and an HTTP store:

    <base>/<name>/<tag>.json     {"digest": "sha256:<hex>", "size": N, "format": "raw|qcow2",
                                  "kind": "disk|kernel|initrd"}
    <base>/blobs/sha256/<hex>    the bytes

Three parts:

- `StoreDir` writes such a directory (good images and deliberately broken ones); `qcow2_image()`
  makes qcow2 bytes with `qemu-img`.
- `ImageStoreServer` serves a StoreDir over HTTP/1.1 under a path prefix ("/images/" by default),
  with faults set per path at run time (see `Fault`) and a per-path GET counter. It runs in a
  thread of whatever process creates it.
- `ServerProcess` runs the server as a child process inside a network namespace (a harness Node's
  `netns`, whose loopback is not the test process's) and controls it over the child's stdin and
  stdout, one JSON object per line. Killing it (SIGKILL, by pid) is "the server went away".

Paths given to the fault and counter calls are relative to the base: "blobs/sha256/<hex>" or
"<name>/<tag>.json" (`StoreDir.blob_path()` / `StoreDir.manifest_path()`).

Run by hand: python3 image_store_server.py ROOT [--prefix /images/] [--port N]; it prints
{"port": N} once it listens, then reads commands on stdin until EOF (see `_control`).
"""

import argparse
import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

BLOB_DIR = os.path.join("blobs", "sha256")


# ---- the store directory ----

class Image:
    """What StoreDir.add wrote: `ref` "name:tag", `digest` "sha256:<hex>", `hex`, `data` (the
    bytes the digest is of), `size` (as the manifest says), `manifest` (the dict written)."""

    def __init__(self, ref, hex_digest, data, manifest):
        self.ref = ref
        self.hex = hex_digest
        self.digest = "sha256:" + hex_digest
        self.data = data
        self.size = manifest.get("size")
        self.manifest = manifest

    @property
    def blob_path(self):
        return "blobs/sha256/" + self.hex

    @property
    def manifest_path(self):
        name, tag = self.ref.split(":", 1)
        return "%s/%s.json" % (name, tag)


class StoreDir:
    """A shared-store directory at `root` (created if missing)."""

    def __init__(self, root):
        self.root = root
        os.makedirs(os.path.join(root, BLOB_DIR), exist_ok=True)

    def write_blob(self, data, hex_digest=None):
        """Writes `data` as the blob named `hex_digest` (default: its real SHA-256); returns the
        hex name."""
        hex_digest = hex_digest or hashlib.sha256(data).hexdigest()
        with open(os.path.join(self.root, BLOB_DIR, hex_digest), "wb") as f:
            f.write(data)
        return hex_digest

    def write_manifest(self, ref, manifest):
        """Writes <name>/<tag>.json: `manifest` is a dict (dumped) or str (written as is)."""
        name, tag = ref.split(":", 1)
        os.makedirs(os.path.join(self.root, name), exist_ok=True)
        with open(os.path.join(self.root, name, tag + ".json"), "w") as f:
            f.write(manifest if isinstance(manifest, str) else json.dumps(manifest))

    def add(self, ref, data, fmt="raw", kind="disk", size=None, blob=None):
        """A manifest for `data` plus its blob; returns the Image. Deliberate lies: `size`
        overrides the manifest's size; `blob` (bytes) is stored under data's digest instead of
        `data`, and blob=False stores no blob at all."""
        hex_digest = hashlib.sha256(data).hexdigest()
        if blob is not False:
            self.write_blob(data if blob is None else blob, hex_digest)
        manifest = {"digest": "sha256:" + hex_digest,
                    "size": len(data) if size is None else size, "format": fmt, "kind": kind}
        self.write_manifest(ref, manifest)
        return Image(ref, hex_digest, data, manifest)

    def blob_file(self, image):
        return os.path.join(self.root, BLOB_DIR, image.hex)


def qcow2_image(workdir, size="64M", backing=None, backing_fmt="raw", options=None):
    """The bytes of a fresh `qemu-img create -f qcow2` image (virtual size `size`), optionally
    with a backing file reference (not opened: -u) or extra -o options (e.g. an external data
    file: "data_file=<path>"). Made in `workdir`."""
    path = os.path.join(workdir, "fixture-%d.qcow2" % time.monotonic_ns())
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-u", "-b", backing, "-F", backing_fmt]
    if options:
        argv += ["-o", options]
    argv += [path, size]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)
    with open(path, "rb") as f:
        data = f.read()
    os.unlink(path)
    return data


# ---- the HTTP server ----

class Fault:
    """How the server answers GETs of one path until the fault is cleared:

    - status=CODE: answers CODE (404, 500...) with an empty body;
    - corrupt: the right Content-Length, one byte flipped in the middle;
    - truncate=N: declares the full Content-Length, sends N bytes, closes the connection;
    - pause=N: sends the headers and N bytes, then waits until `release` (the rest follows) or
      `release(abort=True)` (the connection is closed); never released, it is a stalled server;
    - rate=BYTES_PER_S: sends the body at that rate (keeps a transfer in flight).
    """

    def __init__(self, status=None, corrupt=False, truncate=None, pause=None, rate=None):
        self.status = status
        self.corrupt = corrupt
        self.truncate = truncate
        self.pause = pause
        self.rate = rate
        self.released = threading.Event()
        self.abort = False

    def release(self, abort=False):
        self.abort = abort
        self.released.set()


class ImageStoreServer:
    """Serves directory `root` at http://127.0.0.1:<port><prefix> from a thread."""

    def __init__(self, root, prefix="/images/", host="127.0.0.1", port=0):
        self.root = os.path.realpath(root)
        self.prefix = prefix if prefix.endswith("/") else prefix + "/"
        self._lock = threading.Lock()
        self._faults = {}
        self._gets = {}
        self._closing = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, fmt, *args):  # noqa: N802 (stdlib name)
                sys.stderr.write("image_store_server: %s\n" % (fmt % args))

            def do_GET(self):  # noqa: N802 (stdlib name)
                try:
                    server._get(self)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self._httpd = http.server.ThreadingHTTPServer((host, port), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = None

    def url(self):
        return "http://127.0.0.1:%d%s" % (self.port, self.prefix)

    def start(self):
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self):
        self._closing.set()
        with self._lock:
            for f in self._faults.values():
                f.release(abort=True)
        self._httpd.shutdown()
        self._httpd.server_close()

    # ---- control ----

    def set_fault(self, path, **kw):
        with self._lock:
            old = self._faults.get(path)
            self._faults[path] = Fault(**kw)
        if old:
            old.release()

    def clear_fault(self, path=None):
        """Removes the fault of `path` (every fault when None); held transfers continue."""
        with self._lock:
            gone = list(self._faults.values()) if path is None else [self._faults.get(path)]
            if path is None:
                self._faults.clear()
            else:
                self._faults.pop(path, None)
        for f in gone:
            if f:
                f.release()

    def release(self, path, abort=False):
        """Ends the pause of transfers of `path` that are held (and of later ones: the fault
        stays, its pause is over): they finish, or with abort their connections are closed."""
        with self._lock:
            f = self._faults.get(path)
        if f:
            f.release(abort)

    def gets(self):
        """{path: number of GET requests so far}."""
        with self._lock:
            return dict(self._gets)

    # ---- serving ----

    def _get(self, h):
        url_path = h.path.split("?", 1)[0]
        if not url_path.startswith(self.prefix):
            return self._send_status(h, 404)
        rel = url_path[len(self.prefix):]
        with self._lock:
            self._gets[rel] = self._gets.get(rel, 0) + 1
            fault = self._faults.get(rel)
        full = os.path.realpath(os.path.join(self.root, rel))
        if not full.startswith(self.root + os.sep) or not os.path.isfile(full):
            return self._send_status(h, 404)
        if fault and fault.status:
            return self._send_status(h, fault.status)
        with open(full, "rb") as f:
            data = f.read()
        if fault and fault.corrupt and data:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
        h.send_response(200)
        h.send_header("Content-Type", "application/octet-stream")
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if fault is None:
            h.wfile.write(data)
            return None
        if fault.truncate is not None:
            h.wfile.write(data[:fault.truncate])
            return self._drop(h)
        sent = 0
        if fault.pause is not None:
            sent = min(fault.pause, len(data))
            h.wfile.write(data[:sent])
            h.wfile.flush()
            while not fault.released.wait(0.2):
                if self._closing.is_set():
                    return self._drop(h)
            if fault.abort:
                return self._drop(h)
        if fault.rate:
            chunk = max(1, fault.rate // 20)
            while sent < len(data):
                h.wfile.write(data[sent:sent + chunk])
                h.wfile.flush()
                sent += chunk
                time.sleep(0.05)
            return None
        h.wfile.write(data[sent:])
        return None

    @staticmethod
    def _send_status(h, code):
        h.send_response(code)
        h.send_header("Content-Length", "0")
        h.end_headers()

    @staticmethod
    def _drop(h):
        h.wfile.flush()
        h.close_connection = True
        try:
            h.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


# ---- as a child process in a network namespace ----

class ServerProcess:
    """An ImageStoreServer in a child process (inside network namespace `netns` when given),
    controlled by the methods below; `kill()` SIGKILLs it by pid. `port` may be given to come
    back on the port of a killed predecessor."""

    def __init__(self, root, netns=None, prefix="/images/", port=0, log_path=None):
        argv = [sys.executable, os.path.abspath(__file__), root, "--prefix", prefix,
                "--port", str(port)]
        if netns:
            # nsenter execs (no --fork): the pid is the server's.
            argv = ["nsenter", "--net=/run/netns/" + netns, "--"] + argv
        self._log = open(log_path, "a") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        self.prefix = prefix
        line = self.proc.stdout.readline()
        try:
            self.port = json.loads(line)["port"]
        except (ValueError, KeyError, TypeError):
            self.kill()
            raise RuntimeError("image store server did not start (printed %r)" % line)

    def url(self):
        return "http://127.0.0.1:%d%s" % (self.port, self.prefix)

    def _call(self, **cmd):
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("image store server is gone (command %r)" % cmd)
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError("image store server: %s" % reply["error"])
        return reply

    def set_fault(self, path, **kw):
        self._call(op="fault", path=path, fault=kw)

    def clear_fault(self, path=None):
        self._call(op="clear", path=path)

    def release(self, path, abort=False):
        self._call(op="release", path=path, abort=abort)

    def gets(self, path=None):
        """{path: GETs so far}, or the count of one path."""
        counts = self._call(op="gets")["gets"]
        return counts if path is None else counts.get(path, 0)

    def alive(self):
        return self.proc.poll() is None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)
        self._close_files()

    def close(self):
        """Stops the server: EOF on its stdin ends it (SIGKILL if it lingers)."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.send_signal(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._close_files()

    def _close_files(self):
        for f in (self.proc.stdin, self.proc.stdout):
            if f and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass
        if self._log is not subprocess.DEVNULL and not self._log.closed:
            self._log.close()


def _control(server, line):
    """One command: {"op": "fault", "path": P, "fault": {Fault kwargs}} | {"op": "clear",
    "path": P or null} | {"op": "release", "path": P, "abort": bool} | {"op": "gets"}."""
    cmd = json.loads(line)
    op = cmd.get("op")
    if op == "fault":
        server.set_fault(cmd["path"], **cmd.get("fault", {}))
    elif op == "clear":
        server.clear_fault(cmd.get("path"))
    elif op == "release":
        server.release(cmd["path"], bool(cmd.get("abort")))
    elif op == "gets":
        return {"ok": True, "gets": server.gets()}
    else:
        return {"error": "unknown op %r" % op}
    return {"ok": True}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("root")
    p.add_argument("--prefix", default="/images/")
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    server = ImageStoreServer(args.root, args.prefix, port=args.port).start()
    print(json.dumps({"port": server.port}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            reply = _control(server, line)
        except (ValueError, KeyError, TypeError) as e:
            reply = {"error": "%s: %s" % (type(e).__name__, e)}
        print(json.dumps(reply), flush=True)
    server.stop()


if __name__ == "__main__":
    main()
