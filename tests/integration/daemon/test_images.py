"""Integration tests of the image store (issue 3): a real nodemanagerd pulling from a shared store
that is a directory, or the same directory served over HTTP by image_store_server.py from inside
the node's network namespace (loopback there is the daemon's, not this process's).

What is checked is what a host operator would see: nodectl's answers and exit codes, the events,
and the daemon's cache on disk (<state-dir>/images: sha256/<hex>, meta/<hex>.json,
tags/<name>/<tag>.json, tmp/). A failed pull must leave no blob, tag, metadata or temporary file.

The cases that are the same for both stores are written once (PullCases, DiskFullCases) and run
for each (DirectoryStore*, HttpStore*). HTTP-only faults (truncated or corrupted transfer, a
server that stalls or dies, single flight of concurrent creates, a daemon killed mid-pull) are in
HttpStoreFaults; cache management (create pulling on demand, GC, pin, rm, verify) in
CacheManagement.

Run: NM_BUILD_DIR=<build> python3 -m unittest -v test_images   (from this directory, as root)
"""

import json
import os
import subprocess
import sys
import time
import unittest

import harness
from image_store_server import ServerProcess, StoreDir, qcow2_image
from test_daemon import NodeTestCase, spec

KIB = 1024
MIB = 1024 * 1024

CACHE_SUBDIRS = ("sha256/", "meta/", "tags/", "tmp/")


def flip_byte(data, at=None):
    at = len(data) // 2 if at is None else at
    return data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]


def failure_text(obj):
    """"<ErrorName>: <message>" of a failed job entry or an error answer ("" when neither)."""
    if not isinstance(obj, dict):
        return ""
    return "%s: %s" % (obj.get("error", ""), obj.get("message", ""))


class ImageTestCase(NodeTestCase):
    """One node whose daemon pulls from `self.store`: as a directory source ("dir:<root>"), or
    with http = True served by an ImageStoreServer child process in the node's network namespace
    ("http://127.0.0.1:<port>/images/"). With images_tmpfs (bytes), the daemon's image cache is
    a tmpfs of that size (mounted in the node's mount namespace before the daemon starts)."""

    http = False
    images_tmpfs = None
    daemon_args = ()

    def setUp(self):
        # NodeTestCase.setUp is not called: the store (and server) must exist before the daemon.
        self.node = harness.Node()
        self.addCleanup(self._close_node)
        self.server = None
        self.addCleanup(self._stop_server)  # runs before _close_node (cleanups are LIFO)
        self.store = StoreDir(os.path.join(self.node.tmp, "store"))
        self.images_dir = os.path.join(self.node.state_dir, "images")
        if self.images_tmpfs:
            self.node.mount_tmpfs(self.images_dir, self.images_tmpfs)
        if self.http:
            self.start_server()
            self.source = self.server.url()
        else:
            self.source = "dir:" + self.store.root
        self.node.start_bus()
        self.node.start_daemon(self.daemon_flags())

    def daemon_flags(self, *extra, sources=None):
        """The daemon's arguments: the sources, no reserves, no periodic GC, then daemon_args
        and `extra` ("--flag", "value" pairs), which override those defaults."""
        args = []
        for s in sources or [self.source]:
            args += ["--image-source", s]
        flags = {"--image-reserve-mib": "0", "--disk-reserve-mib": "0",
                 "--image-gc-interval": "0"}
        pairs = list(self.daemon_args) + list(extra)
        flags.update(zip(pairs[0::2], pairs[1::2]))
        for k, v in flags.items():
            args += [k, v]
        return args

    def restart_daemon(self, *extra):
        """SIGTERM, then a start with daemon_flags(*extra)."""
        self.assertEqual(self.node.stop_daemon(), 0, self.node.daemon_log())
        self.node.start_daemon(self.daemon_flags(*extra))

    def start_server(self, port=0):
        self.server = ServerProcess(self.store.root, netns=self.node.netns, port=port,
                                    log_path=os.path.join(self.node.tmp, "image-server.log"))
        return self.server

    def _stop_server(self):
        if self.server is not None:
            if self._failed():
                try:
                    with open(os.path.join(self.node.tmp, "image-server.log")) as f:
                        sys.stderr.write("\n==== image_store_server (%s) ====\n%s\n" %
                                         (self.id(), f.read()[-5000:]))
                except OSError:
                    pass
            self.server.close()

    # ---- nodectl ----

    @staticmethod
    def results(r):
        """The per-image objects of `image pull --json` (a JSON array), or [] when it printed
        something else (an error answer)."""
        return r.json if isinstance(r.json, list) else []

    def pull(self, *refs, expect=0, timeout=90):
        r = self.ctl("image", "pull", *refs, expect=expect, timeout=timeout)
        if expect == 0:
            got = self.results(r)
            self.assertEqual([(x.get("image"), x.get("result")) for x in got],
                             [(ref, "done") for ref in refs], r)
        return r

    def pull_failure(self, ref, error, *words):
        """Pulls `ref`, which must fail: non-zero exit, the entry "failed" (or the whole call
        refused) with error name `error` (or one of a tuple) and a message containing one of
        `words` (case-insensitive). Returns the "<Error>: <message>" text."""
        r = self.pull(ref, expect=None)
        self.assertNotEqual(r.rc, 0, r)
        got = self.results(r)
        if got:
            self.assertEqual(len(got), 1, r)
            self.assertEqual((got[0].get("image"), got[0].get("result")), (ref, "failed"), r)
            entry = got[0]
        else:
            entry = r.json
        self.assert_failure(entry, error, *words)
        return failure_text(entry)

    def assert_failure(self, entry, error, *words):
        """`entry` (a job or error answer) failed with `error` (a name or a tuple of names), its
        message containing one of `words` (case-insensitive)."""
        errors = (error,) if isinstance(error, str) else error
        self.assertIsInstance(entry, dict)
        self.assertIn(entry.get("error"), errors, entry)
        message = entry.get("message", "").lower()
        self.assertTrue(any(w.lower() in message for w in words),
                        "expected one of %r in the message: %r" % (words, entry))

    def image_rows(self):
        r = self.ctl("image", "list")
        self.assertIsInstance(r.json, list, r)
        return r.json

    def image_row(self, image):
        rows = [x for x in self.image_rows() if x["image"] == image]
        self.assertEqual(len(rows), 1, "one row for '%s' in %r" % (image, self.image_rows()))
        return rows[0]

    def events_of(self, kind, since=0):
        return [e for e in self.events(since) if e["kind"] == kind]

    def last_seq(self):
        evs = self.events()
        return evs[-1]["seq"] if evs else 0

    def spawn(self, *args):
        return self.node.spawn_nodectl(*args)

    @staticmethod
    def finish(proc, timeout=120):
        """Waits for a spawned nodectl; returns (rc, parsed stdout or None, stderr)."""
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return None, out, err
        try:
            parsed = json.loads(out) if out.strip() else None
        except ValueError:
            parsed = None
        return proc.returncode, parsed, err

    def spawn_create(self, name, image="base:1"):
        path = self.node.write(name + ".json", spec(name, "contoso", image=image))
        return self.spawn("vm", "create", "-f", path, "--wait")

    # ---- the cache on disk ----

    def cache_files(self):
        """Regular files under the cache directory, relative to it, as the daemon sees them
        (also when it is a tmpfs of the node's mount namespace)."""
        p = self.node.run("find", self.images_dir, "-type", "f", "-printf", "%P\\n")
        if p.returncode != 0 and not os.path.isdir(self.images_dir):
            return []
        self.assertEqual(p.returncode, 0, p.stderr)
        return sorted(p.stdout.split())

    def cache_blob(self, image):
        return os.path.join(self.images_dir, "sha256", image.hex)

    def assert_not_cached(self, *images):
        """No blob, metadata or tag of `images`, no temporary file, and no row in image list."""
        files = self.cache_files()
        self.assertEqual([f for f in files if f.startswith("tmp/")], [], "tmp/ is empty")
        for img in images:
            name, tag = img.ref.split(":", 1)
            for f in ("sha256/" + img.hex, "meta/%s.json" % img.hex,
                      "tags/%s/%s.json" % (name, tag)):
                self.assertNotIn(f, files)
        digests = {img.digest for img in images}
        refs = {img.ref for img in images}
        for row in self.image_rows():
            self.assertNotIn(row["digest"], digests, row)
            self.assertNotIn(row["image"], refs, row)

    def assert_cache_empty(self):
        """Nothing in sha256/, meta/, tags/ or tmp/, and an empty image list."""
        self.assertEqual([f for f in self.cache_files() if f.startswith(CACHE_SUBDIRS)], [])
        self.assertEqual(self.image_rows(), [])

    def assert_cached(self, img):
        """The pulled blob holds exactly the bytes, under its tag and metadata."""
        p = self.node.run("sha256sum", self.cache_blob(img))
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertEqual(p.stdout.split()[0], img.hex, "cached bytes of '%s'" % img.ref)
        name, tag = img.ref.split(":", 1)
        files = self.cache_files()
        self.assertIn("tags/%s/%s.json" % (name, tag), files)
        self.assertIn("meta/%s.json" % img.hex, files)
        self.assertEqual([f for f in files if f.startswith("tmp/")], [], "tmp/ is empty")


# ---------------------------------------------------------------------------------------------
# Pulls: the same cases against a directory store and an HTTP store.
# ---------------------------------------------------------------------------------------------

class PullCases:

    def test_pull_caches_the_verified_image_and_reports_it(self):
        img = self.store.add("base:1", os.urandom(MIB + 123))
        seq = self.last_seq()
        r = self.pull("base:1")
        got = self.results(r)[0]
        self.assertEqual(got.get("digest"), img.digest, r)
        self.assertIsInstance(got.get("job_id"), int, r)

        row = self.image_row("base:1")
        self.assertEqual({k: row.get(k) for k in ("digest", "kind", "format", "size",
                                                  "virtual_size", "tenant", "pinned", "users")},
                         {"digest": img.digest, "kind": "disk", "format": "raw",
                          "size": len(img.data), "virtual_size": len(img.data), "tenant": "",
                          "pinned": False, "users": []})
        self.assertIn("last_used_us", row)
        self.assert_cached(img)

        pulled = self.events_of("ImagePulled", seq)
        self.assertEqual(len(pulled), 1, pulled)
        p = pulled[0]["payload"]
        self.assertEqual((p.get("image"), p.get("digest"), p.get("source"), p.get("bytes")),
                         ("base:1", img.digest, self.source, len(img.data)), p)
        self.assertTrue(p.get("transferred"), p)

        # Cached: a second pull answers from the cache, without another transfer.
        again = self.results(self.pull("base:1"))[0]
        self.assertEqual(again.get("digest"), img.digest)
        if self.http:
            self.assertEqual(self.server.gets(img.blob_path), 1)
        self.assertEqual(len(self.image_rows()), 1)

    def test_pull_of_a_list_warms_every_image_and_reports_each(self):
        disk = self.store.add("debian:12", os.urandom(300 * KIB))
        kernel = self.store.add("vmlinuz:6", os.urandom(100 * KIB), kind="kernel")
        r = self.pull("debian:12", "ghost:1", "vmlinuz:6", expect=None)
        self.assertNotEqual(r.rc, 0, "one of three failed: %r" % r)
        got = {x.get("image"): x for x in self.results(r)}
        self.assertEqual(set(got), {"debian:12", "ghost:1", "vmlinuz:6"}, r)
        self.assertEqual(got["debian:12"]["result"], "done")
        self.assertEqual(got["debian:12"].get("digest"), disk.digest)
        self.assertEqual(got["vmlinuz:6"]["result"], "done")
        self.assertEqual(got["ghost:1"]["result"], "failed")
        self.assertEqual(got["ghost:1"].get("error"), "NotFound", got["ghost:1"])
        self.assertIn("ghost:1", got["ghost:1"].get("message", ""))
        self.assertEqual({(x["image"], x["kind"]) for x in self.image_rows()},
                         {("debian:12", "disk"), ("vmlinuz:6", "kernel")})
        self.assert_cached(disk)
        self.assert_cached(kernel)

    def test_blob_whose_bytes_do_not_match_the_digest_is_refused(self):
        data = os.urandom(512 * KIB)
        img = self.store.add("base:1", data, blob=flip_byte(data))
        self.pull_failure("base:1", "InvalidArgument", "hash", "mismatch")
        self.assert_cache_empty()

    def test_manifest_size_larger_than_the_blob_is_refused(self):
        img = self.store.add("base:1", os.urandom(512 * KIB))
        self.store.write_manifest("base:1", dict(img.manifest, size=len(img.data) + 4096))
        self.pull_failure("base:1", "Unavailable", "truncated")
        self.assert_cache_empty()

    def test_manifest_size_smaller_than_the_blob_is_refused(self):
        img = self.store.add("base:1", os.urandom(512 * KIB))
        self.store.write_manifest("base:1", dict(img.manifest, size=len(img.data) - 4096))
        self.pull_failure("base:1", "InvalidArgument", "larger")
        self.assert_cache_empty()

    def test_manifest_without_its_blob_is_not_found(self):
        img = self.store.add("base:1", os.urandom(64 * KIB), blob=False)
        self.pull_failure("base:1", "NotFound", img.hex)
        self.assert_cache_empty()

    def test_manifest_with_an_unknown_field_is_refused_naming_it(self):
        img = self.store.add("base:1", os.urandom(64 * KIB))
        self.store.write_manifest("base:1", dict(img.manifest, colour="blue"))
        self.pull_failure("base:1", "InvalidArgument", "colour")
        self.assert_cache_empty()

    def test_qcow2_image_is_pulled_with_its_virtual_size(self):
        img = self.store.add("cloud:1", qcow2_image(self.node.tmp, "64M"), fmt="qcow2")
        self.pull("cloud:1")
        row = self.image_row("cloud:1")
        self.assertEqual((row["format"], row["size"], row["virtual_size"]),
                         ("qcow2", len(img.data), 64 * MIB), row)
        self.assert_cached(img)

    def test_qcow2_with_a_backing_file_is_refused(self):
        img = self.store.add("evil:1", qcow2_image(self.node.tmp, backing="/etc/shadow"),
                             fmt="qcow2")
        self.assertIn(b"/etc/shadow", img.data, "the fixture really names the backing file")
        self.pull_failure("evil:1", "InvalidArgument", "backing")
        self.assert_cache_empty()

    def test_qcow2_with_an_external_data_file_is_refused(self):
        ext = os.path.join(self.node.tmp, "external-data.raw")
        img = self.store.add("evil:2", qcow2_image(self.node.tmp, "16M",
                                                   options="data_file=" + ext), fmt="qcow2")
        self.assertIn(ext.encode(), img.data, "the fixture really names the data file")
        self.pull_failure("evil:2", "InvalidArgument", "data file", "data_file")
        self.assert_cache_empty()

    def test_qcow2_bytes_under_a_raw_manifest_are_refused(self):
        self.store.add("liar:1", qcow2_image(self.node.tmp), fmt="raw")
        self.pull_failure("liar:1", "InvalidArgument", "qcow2")
        self.assert_cache_empty()

    def test_raw_bytes_under_a_qcow2_manifest_are_refused(self):
        self.store.add("liar:2", os.urandom(256 * KIB), fmt="qcow2")
        self.pull_failure("liar:2", "InvalidArgument", "qcow2")
        self.assert_cache_empty()


class DirectoryStorePulls(PullCases, ImageTestCase):
    pass


class HttpStorePulls(PullCases, ImageTestCase):
    http = True


class DiskFullCases:
    """The cache is a 6 MiB tmpfs."""

    images_tmpfs = 6 * MIB

    def test_image_larger_than_the_cache_fs_fails_and_leaves_nothing(self):
        big = self.store.add("big:1", os.urandom(8 * MIB))
        self.pull_failure("big:1", "InsufficientCapacity", "space", "free")
        self.assert_cache_empty()
        # The fs works: a small image fits.
        small = self.store.add("small:1", os.urandom(512 * KIB))
        self.pull("small:1")
        self.assertEqual([x["image"] for x in self.image_rows()], ["small:1"])
        self.assert_not_cached(big)
        self.assertIn("sha256/" + small.hex, self.cache_files())

    def test_pull_is_admitted_against_the_configured_reserve(self):
        img = self.store.add("mid:1", os.urandom(2 * MIB))
        self.restart_daemon("--image-reserve-mib", "5")  # 2 MiB + 5 MiB > 6 MiB free
        self.pull_failure("mid:1", "InsufficientCapacity", "reserve")
        self.assert_cache_empty()
        self.restart_daemon("--image-reserve-mib", "1")
        self.pull("mid:1")
        self.assertIn("sha256/" + img.hex, self.cache_files())


class DirectoryStoreDiskFull(DiskFullCases, ImageTestCase):
    pass


class HttpStoreDiskFull(DiskFullCases, ImageTestCase):
    http = True

    def test_disk_filling_up_during_the_transfer_leaves_nothing(self):
        img = self.store.add("base:1", os.urandom(3 * MIB))
        self.server.set_fault(img.blob_path, pause=512 * KIB)
        puller = self.spawn("image", "pull", "base:1")
        try:
            self.wait_until("the transfer to start",
                            lambda: self.server.gets(img.blob_path) == 1)
            # Someone else fills the file system while the pull is in flight.
            filler = os.path.join(self.images_dir, "zz-filler")
            self.node.run("dd", "if=/dev/zero", "of=" + filler, "bs=64k", "count=200")
            self.server.release(img.blob_path)
            rc, out, err = self.finish(puller, timeout=60)
        finally:
            if puller.poll() is None:
                puller.kill()
                puller.communicate()
        if rc == 0:
            # Allowed only if the daemon reserved its space before the filler came.
            self.assert_cached(img)
            return
        self.assertIsNotNone(rc, "the pull did not end")
        entry = out[0] if isinstance(out, list) else out
        self.assert_failure(entry, "InsufficientCapacity", "space")
        self.assert_cache_empty()
        self.node.run("rm", "-f", filler, check=True)
        self.server.clear_fault()
        self.pull("base:1")
        self.assert_cached(img)


# ---------------------------------------------------------------------------------------------
# HTTP transfer faults.
# ---------------------------------------------------------------------------------------------

class HttpStoreFaults(ImageTestCase):

    http = True
    daemon_args = ("--workers", "24")
    CONCURRENT = 12

    def test_truncated_transfer_is_refused_and_a_retry_succeeds(self):
        img = self.store.add("base:1", os.urandom(MIB))
        self.server.set_fault(img.blob_path, truncate=300 * KIB)
        self.pull_failure("base:1", "Unavailable", "truncated")
        self.assert_cache_empty()
        self.server.clear_fault()
        self.pull("base:1")
        self.assert_cached(img)
        self.assertEqual(self.server.gets(img.blob_path), 2)

    def test_bytes_corrupted_in_transit_are_refused(self):
        img = self.store.add("base:1", os.urandom(MIB))
        self.server.set_fault(img.blob_path, corrupt=True)
        self.pull_failure("base:1", "InvalidArgument", "hash", "mismatch")
        self.assert_cache_empty()
        self.server.clear_fault()
        self.pull("base:1")
        self.assert_cached(img)

    def test_server_errors_are_unavailable_and_a_missing_tag_not_found(self):
        img = self.store.add("base:1", os.urandom(64 * KIB))
        self.server.set_fault(img.blob_path, status=500)
        self.pull_failure("base:1", "Unavailable", "500")
        self.server.set_fault(img.manifest_path, status=503)
        self.pull_failure("base:1", "Unavailable", "503")
        self.server.set_fault(img.manifest_path, status=404)
        self.pull_failure("base:1", "NotFound", "base:1")
        self.assert_cache_empty()

    def test_server_killed_mid_transfer_fails_the_pull_then_it_can_be_retried(self):
        img = self.store.add("base:1", os.urandom(2 * MIB))
        self.server.set_fault(img.blob_path, pause=256 * KIB)
        puller = self.spawn("image", "pull", "base:1")
        try:
            self.wait_until("the transfer to start",
                            lambda: self.server.gets(img.blob_path) == 1)
            port = self.server.port
            self.server.kill()
            rc, out, err = self.finish(puller, timeout=40)
        finally:
            if puller.poll() is None:
                puller.kill()
                puller.communicate()
        self.assertNotIn(rc, (None, 0), (out, err))
        entry = out[0] if isinstance(out, list) else out
        self.assertEqual((entry or {}).get("result"), "failed", (out, err))
        self.assert_failure(entry, "Unavailable", "truncated", "connection")
        self.assert_cache_empty()
        # The store comes back (same address): the pull succeeds.
        self.start_server(port=port)
        self.pull("base:1")
        self.assert_cached(img)

    def test_stalled_server_is_given_up_on(self):
        img = self.store.add("base:1", os.urandom(MIB))
        self.server.set_fault(img.blob_path, pause=128 * KIB)  # never released
        t0 = time.monotonic()
        self.pull_failure("base:1", "Unavailable", "stall", "timed out", "timeout")
        self.assertLess(time.monotonic() - t0, 45, "given up on within the stall timeout")
        self.assert_cache_empty()

    def test_concurrent_creates_and_pulls_of_one_uncached_image_share_one_transfer(self):
        img = self.store.add("base:1", os.urandom(2 * MIB))
        self.server.set_fault(img.blob_path, pause=64 * KIB)
        names = ["web-%d" % i for i in range(self.CONCURRENT)]
        procs = [self.spawn_create(n) for n in names]
        procs += [self.spawn("image", "pull", "base:1") for _ in range(3)]
        try:
            self.wait_until("every create acknowledged and the transfer started",
                            lambda: len(self.vms()) == len(names) and
                            self.server.gets(img.blob_path) >= 1, timeout=30)
            time.sleep(1.0)  # let every job reach the image before the transfer ends
            self.server.release(img.blob_path)
            outcomes = [self.finish(p) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        for (rc, out, err), what in zip(outcomes, names + ["pull"] * 3):
            self.assertEqual(rc, 0, (what, out, err))
        creates = [out for _, out, _ in outcomes[:len(names)]]
        self.assertEqual([c.get("result") for c in creates], ["done"] * len(names), creates)
        self.assertEqual(self.server.gets(img.blob_path), 1, "exactly one transfer")
        row = self.image_row("base:1")
        self.assertEqual(sorted(row["users"]), sorted(names))
        self.assertEqual(self.show("web-0")["image_digest"], img.digest)
        pulled = self.events_of("ImagePulled")
        self.assertEqual(len([e for e in pulled if e["payload"].get("transferred")]), 1, pulled)
        self.assert_cached(img)

    def test_concurrent_creates_all_fail_with_one_failed_transfer_and_a_retry_succeeds(self):
        img = self.store.add("base:1", os.urandom(2 * MIB))
        self.server.set_fault(img.blob_path, pause=64 * KIB)
        names = ["web-%d" % i for i in range(self.CONCURRENT)]
        procs = [self.spawn_create(n) for n in names]
        try:
            self.wait_until("every create acknowledged and the transfer started",
                            lambda: len(self.vms()) == len(names) and
                            self.server.gets(img.blob_path) >= 1, timeout=30)
            time.sleep(1.0)  # let every job reach the image before the transfer ends
            self.server.release(img.blob_path, abort=True)  # later GETs are cut short too
            outcomes = [self.finish(p) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
        for (rc, out, err), name in zip(outcomes, names):
            self.assertEqual(rc, 1, (name, out, err))
            self.assertEqual(out.get("result"), "failed", (name, out))
            self.assert_failure(out, "Unavailable", "truncated")
        self.assertEqual(self.server.gets(img.blob_path), 1, "exactly one transfer")
        self.wait_until("every failed VM gone", lambda: self.vms() == {})
        self.assert_cache_empty()

        self.server.clear_fault()
        r = self.create("web-retry", "contoso")
        self.assertEqual(r.json["result"], "done", r)
        self.assertEqual(self.server.gets(img.blob_path), 2)
        self.assertEqual(self.image_row("base:1")["users"], ["web-retry"])

    def test_daemon_killed_mid_pull_leaves_nothing_and_the_pull_can_be_retried(self):
        img = self.store.add("base:1", os.urandom(4 * MIB))
        self.server.set_fault(img.blob_path, rate=256 * KIB)  # 16 s for the whole blob
        puller = self.spawn("image", "pull", "base:1")
        try:
            self.wait_until("a partial download in the cache",
                            lambda: any(f.startswith("tmp/") for f in self.cache_files()))
            self.node.kill_daemon()
            rc, out, err = self.finish(puller, timeout=20)
        finally:
            if puller.poll() is None:
                puller.kill()
                puller.communicate()
        self.assertEqual(rc, 5, (out, err))  # the daemon left the bus
        self.node.start_daemon(self.daemon_flags())
        self.assert_cache_empty()
        self.server.clear_fault()
        self.pull("base:1")
        self.assert_cached(img)
        self.assertEqual(self.server.gets(img.blob_path), 2)


class SourceOrder(ImageTestCase):
    """Two sources: a directory given as an absolute path, empty at first, then the store."""

    def daemon_flags(self, *extra, sources=None):
        self.first = os.path.join(self.node.tmp, "first-store")
        StoreDir(self.first)
        return super().daemon_flags(*extra, sources=[self.first, self.source])

    def pulled_from(self, seq):
        return [e["payload"].get("source") for e in self.events_of("ImagePulled", seq)]

    def test_sources_are_tried_in_order(self):
        img = self.store.add("base:1", os.urandom(64 * KIB))
        seq = self.last_seq()
        self.pull("base:1")
        self.assertEqual(self.pulled_from(seq), [self.source])
        self.assert_cached(img)
        # A tag both sources have comes from the first.
        first = StoreDir(self.first).add("other:1", os.urandom(64 * KIB))
        self.store.add("other:1", os.urandom(64 * KIB))
        seq = self.last_seq()
        self.pull("other:1")
        self.assertEqual(self.image_row("other:1")["digest"], first.digest)
        self.assertIn(self.pulled_from(seq), ([self.first], ["dir:" + self.first]))


# ---------------------------------------------------------------------------------------------
# The cache: pulls by VM creation, GC, pin, rm, verify (directory store).
# ---------------------------------------------------------------------------------------------

class CacheManagement(ImageTestCase):

    def test_create_pulls_an_uncached_image_on_demand(self):
        img = self.store.add("base:1", os.urandom(MIB))
        before_us = int(time.time() * 1e6)
        r = self.create("web-1", "contoso")
        self.assertEqual(r.json["result"], "done", r)
        pulled = [e["payload"] for e in self.events_of("ImagePulled")]
        self.assertEqual([(p.get("image"), p.get("digest"), p.get("transferred"))
                          for p in pulled], [("base:1", img.digest, True)], pulled)
        self.assertEqual(self.show("web-1")["image_digest"], img.digest)
        row = self.image_row("base:1")
        self.assertEqual(row["users"], ["web-1"])
        self.assertGreaterEqual(row["last_used_us"], before_us - 2_000_000, row)
        self.assert_cached(img)

    def test_create_whose_pull_fails_fails_and_leaves_no_vm(self):
        data = os.urandom(256 * KIB)
        self.store.add("base:1", data, blob=flip_byte(data))
        r = self.create("web-1", "contoso", expect=None)
        self.assertNotEqual(r.rc, 0, r)
        self.assertEqual(r.json.get("result"), "failed", r)
        self.assert_failure(r.json, "InvalidArgument", "hash", "mismatch")
        self.wait_until("the VM gone", lambda: self.vms() == {})
        self.ctl("vm", "show", "web-1", expect=3)
        self.assert_cache_empty()

    def test_create_of_an_image_no_source_has_fails_and_leaves_no_vm(self):
        r = self.create("web-1", "contoso", image="ghost:1", expect=None)
        self.assertIn(r.rc, (1, 3), r)  # the job failed, or the call was refused up front
        self.assert_failure(r.json, "NotFound", "ghost:1")
        self.wait_until("the VM gone", lambda: self.vms() == {})

    def test_gc_removes_only_unused_unpinned_images(self):
        used = self.store.add("used:1", os.urandom(128 * KIB))
        pinned = self.store.add("pinned:1", os.urandom(128 * KIB))
        idle = self.store.add("idle:1", os.urandom(128 * KIB))
        self.pull("used:1", "pinned:1", "idle:1")
        self.create("web-1", "contoso", image="used:1")
        seq = self.last_seq()
        self.ctl("image", "pin", "pinned:1")
        self.assertTrue(self.image_row("pinned:1")["pinned"])
        self.assertEqual([e["object_id"] for e in self.events_of("ImagePinned", seq)],
                         [pinned.digest])

        # Everything is younger than the default minimum age.
        r = self.ctl("image", "gc")
        self.assertEqual((r.json["removed"], r.json["bytes"]), ([], 0), r)
        # A dry run names the idle image and removes nothing.
        r = self.ctl("image", "gc", "--min-age", "0", "--dry-run")
        self.assertEqual([(x["digest"], x["tags"], x["size"]) for x in r.json["removed"]],
                         [(idle.digest, ["idle:1"], len(idle.data))], r)
        self.assertEqual(len(self.image_rows()), 3)

        seq = self.last_seq()
        r = self.ctl("image", "gc", "--min-age", "0")
        self.assertEqual([x["digest"] for x in r.json["removed"]], [idle.digest], r)
        self.assertEqual(r.json["bytes"], len(idle.data))
        self.assertEqual({x["image"] for x in self.image_rows()}, {"used:1", "pinned:1"})
        self.assertEqual([e["object_id"] for e in self.events_of("ImageCollected", seq)],
                         [idle.digest])
        self.assert_not_cached(idle)
        self.assert_cached(used)
        self.assert_cached(pinned)

        # Reference counts come from the database: the same after a restart.
        self.restart_daemon()
        self.assertEqual(self.ctl("image", "gc", "--min-age", "0").json["removed"], [])
        self.assertEqual(self.image_row("used:1")["users"], ["web-1"])

        # Once unused and unpinned, both go.
        self.assertEqual(self.ctl("vm", "delete", "web-1", "--wait").json["result"], "done")
        self.ctl("image", "unpin", "pinned:1")
        self.assertFalse(self.image_row("pinned:1")["pinned"])
        r = self.ctl("image", "gc", "--min-age", "0")
        self.assertEqual(sorted(x["digest"] for x in r.json["removed"]),
                         sorted([used.digest, pinned.digest]), r)
        self.assert_cache_empty()

    def test_periodic_gc_collects_idle_images_and_spares_used_and_pinned_ones(self):
        used = self.store.add("used:1", os.urandom(64 * KIB))
        pinned = self.store.add("pinned:1", os.urandom(64 * KIB))
        idle = self.store.add("idle:1", os.urandom(64 * KIB))
        self.pull("used:1", "pinned:1", "idle:1")
        self.create("web-1", "contoso", image="used:1")
        self.ctl("image", "pin", pinned.digest)
        seq = self.last_seq()
        self.restart_daemon("--image-gc-interval", "10", "--image-gc-min-age", "0")
        self.wait_until("the periodic GC to collect 'idle:1'",
                        lambda: self.events_of("ImageCollected", seq), timeout=25)
        self.assertEqual([e["object_id"] for e in self.events_of("ImageCollected", seq)],
                         [idle.digest])
        self.assertEqual({x["image"] for x in self.image_rows()}, {"used:1", "pinned:1"})
        self.assert_cached(used)
        self.assert_cached(pinned)
        self.assert_not_cached(idle)

    def test_rm_of_an_image_in_use_is_a_conflict_naming_the_vms(self):
        img = self.store.add("base:1", os.urandom(64 * KIB))
        self.create("web-1", "contoso")
        self.create("db-1", "contoso")
        for ref in ("base:1", img.digest):
            r = self.ctl("image", "rm", ref, expect=4)
            self.assertEqual(r.json["error"], "Conflict", r)
            self.assertIn("web-1", r.json["message"])
            self.assertIn("db-1", r.json["message"])
        self.assert_cached(img)
        self.ctl("vm", "delete", "web-1", "--wait")
        self.ctl("image", "rm", "base:1", expect=4)
        self.ctl("vm", "delete", "db-1", "--wait")
        seq = self.last_seq()
        self.ctl("image", "rm", "base:1")
        self.assertEqual([e["object_id"] for e in self.events_of("ImageRemoved", seq)],
                         [img.digest])
        self.assert_cache_empty()

    def test_pin_of_an_unknown_image_is_not_found(self):
        for verb in ("pin", "unpin", "rm", "verify"):
            r = self.ctl("image", verb, "ghost:1", expect=3)
            self.assertEqual(r.json["error"], "NotFound", (verb, r))

    def test_verify_detects_a_blob_corrupted_on_disk(self):
        good = self.store.add("good:1", os.urandom(256 * KIB))
        bad = self.store.add("bad:1", os.urandom(256 * KIB))
        self.pull("good:1", "bad:1")
        r = self.ctl("image", "verify")
        self.assertEqual(r.json, {"checked": 2, "corrupt": []})

        path = self.cache_blob(bad)
        os.chmod(path, os.stat(path).st_mode | 0o200)
        with open(path, "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 0x01]))
        seq = self.last_seq()
        r = self.ctl("image", "verify", expect=None)
        self.assertNotEqual(r.rc, 0, r)
        self.assertEqual(r.json["checked"], 2, r)
        self.assertEqual([(c["digest"], c["tags"]) for c in r.json["corrupt"]],
                         [(bad.digest, ["bad:1"])], r)
        self.assertTrue(r.json["corrupt"][0]["problem"], r)
        self.assertEqual([e["object_id"] for e in self.events_of("ImageCorrupt", seq)],
                         [bad.digest])
        # Only the images asked for.
        r = self.ctl("image", "verify", "good:1")
        self.assertEqual(r.json, {"checked": 1, "corrupt": []})
        r = self.ctl("image", "verify", bad.digest, expect=None)
        self.assertNotEqual(r.rc, 0, r)
        self.assertEqual([c["digest"] for c in r.json["corrupt"]], [bad.digest])

    def test_tmp_is_emptied_at_start(self):
        self.node.stop_daemon()
        tmp = os.path.join(self.images_dir, "tmp")
        os.makedirs(tmp, exist_ok=True)
        with open(os.path.join(tmp, "leftover.partial"), "wb") as f:
            f.write(os.urandom(4096))
        self.node.start_daemon(self.daemon_flags())
        self.assertEqual([f for f in self.cache_files() if f.startswith("tmp/")], [])


if __name__ == "__main__":
    unittest.main(verbosity=2)
