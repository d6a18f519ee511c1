// main() of the system-tier test binaries: before any test runs, the process moves into a new
// network namespace and a new mount namespace with a private /run/netns, so every link, nft table
// and namespace a test creates lives and dies with the process, invisible to the host.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sched.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

int main(int argc, char** argv) {
  testing::InitGoogleTest(&argc, argv);
  if (geteuid() != 0) {
    std::fprintf(stderr, "system tests need root (network namespaces, nftables)\n");
    return 1;
  }
  if (unshare(CLONE_NEWNET | CLONE_NEWNS) != 0) {
    std::fprintf(stderr, "unshare(CLONE_NEWNET|CLONE_NEWNS): %s\n", std::strerror(errno));
    return 1;
  }
  // Our mount changes must not propagate to the host; then a private tmpfs for /run/netns.
  // In a chroot whose root is not a mount point "/" cannot be changed (EINVAL); the tmpfs below
  // is made private on its own then.
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) != 0 && errno != EINVAL) {
    std::fprintf(stderr, "making / private: %s\n", std::strerror(errno));
    return 1;
  }
  mkdir("/run/netns", 0755);
  if (mount("tmpfs", "/run/netns", "tmpfs", 0, "mode=0755") != 0 ||
      mount(nullptr, "/run/netns", nullptr, MS_PRIVATE, nullptr) != 0) {
    std::fprintf(stderr, "private tmpfs on /run/netns: %s\n", std::strerror(errno));
    return 1;
  }
  // The loopback of the new namespace starts down.
  return RUN_ALL_TESTS();
}
