#include "format.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

namespace nm::cli {
namespace {

using nlohmann::json;

TEST(ExitCode, EachCodeHasItsDocumentedExitCode) {
  EXPECT_EQ(exit_code(Code::kOk), 0);
  EXPECT_EQ(exit_code(Code::kInternal), 1);
  EXPECT_EQ(exit_code(Code::kInvalidArgument), 2);
  EXPECT_EQ(exit_code(Code::kNotFound), 3);
  EXPECT_EQ(exit_code(Code::kAlreadyExists), 4);
  EXPECT_EQ(exit_code(Code::kConflict), 4);
  EXPECT_EQ(exit_code(Code::kUnavailable), 5);
  EXPECT_EQ(exit_code(Code::kAccessDenied), 6);
  EXPECT_EQ(exit_code(Code::kQuotaExceeded), 7);
  EXPECT_EQ(exit_code(Code::kInsufficientCapacity), 7);
}

TEST(DbusErrorMapping, DaemonErrorsMapByName) {
  EXPECT_EQ(code_from_dbus_error("org.nodemanager.NodeManager1.Error.NotFound"), Code::kNotFound);
  EXPECT_EQ(code_from_dbus_error("org.nodemanager.NodeManager1.Error.InvalidArgument"),
            Code::kInvalidArgument);
  EXPECT_EQ(code_from_dbus_error("org.nodemanager.NodeManager1.Error.AlreadyExists"),
            Code::kAlreadyExists);
  EXPECT_EQ(code_from_dbus_error("org.nodemanager.NodeManager1.Error.QuotaExceeded"),
            Code::kQuotaExceeded);
  EXPECT_EQ(code_from_dbus_error("org.nodemanager.NodeManager1.Error.Bogus"), Code::kInternal);
  EXPECT_EQ(code_from_dbus_error("org.nodemanager.NodeManager1.Error.Ok"), Code::kInternal);
}

TEST(DbusErrorMapping, MissingDaemonAndTimeoutsAreUnavailable) {
  EXPECT_EQ(code_from_dbus_error("org.freedesktop.DBus.Error.ServiceUnknown"), Code::kUnavailable);
  EXPECT_EQ(code_from_dbus_error("org.freedesktop.DBus.Error.NameHasNoOwner"), Code::kUnavailable);
  EXPECT_EQ(code_from_dbus_error("org.freedesktop.DBus.Error.NoReply"), Code::kUnavailable);
  EXPECT_EQ(code_from_dbus_error("org.freedesktop.DBus.Error.Timeout"), Code::kUnavailable);
  EXPECT_EQ(code_from_dbus_error("System.Error.ECONNREFUSED"), Code::kUnavailable);
  EXPECT_EQ(code_from_dbus_error("org.freedesktop.DBus.Error.AccessDenied"), Code::kAccessDenied);
  EXPECT_EQ(code_from_dbus_error("org.freedesktop.DBus.Error.InvalidArgs"), Code::kInvalidArgument);
  EXPECT_EQ(code_from_dbus_error("org.freedesktop.DBus.Error.UnknownMethod"), Code::kInternal);
  EXPECT_EQ(exit_code(code_from_dbus_error("org.freedesktop.DBus.Error.ServiceUnknown")), 5);
}

TEST(ErrorJson, CarriesCodeNameAndMessage) {
  const json j = json::parse(error_json(not_found("vm 'web-1' does not exist")));
  EXPECT_EQ(j["error"], "NotFound");
  EXPECT_EQ(j["message"], "vm 'web-1' does not exist");
}

TEST(ShortErrorName, StripsOurPrefixOnly) {
  EXPECT_EQ(short_error_name("org.nodemanager.NodeManager1.Error.Conflict"), "Conflict");
  EXPECT_EQ(short_error_name("org.freedesktop.DBus.Error.NoReply"),
            "org.freedesktop.DBus.Error.NoReply");
}

TEST(NormalizeSha256, AcceptsBareOrPrefixedHexAnyCase) {
  const std::string hex(64, 'a');
  EXPECT_EQ(*normalize_sha256(hex), "sha256:" + hex);
  EXPECT_EQ(*normalize_sha256("sha256:" + std::string(64, 'B')), "sha256:" + std::string(64, 'b'));
}

TEST(NormalizeSha256, RefusesWrongLengthOrNonHex) {
  EXPECT_EQ(normalize_sha256(std::string(63, 'a')).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(normalize_sha256(std::string(65, 'a')).status().code(), Code::kInvalidArgument);
  EXPECT_EQ(normalize_sha256(std::string(63, 'a') + "g").status().code(), Code::kInvalidArgument);
  EXPECT_EQ(normalize_sha256("md5:" + std::string(64, 'a')).status().code(),
            Code::kInvalidArgument);
  EXPECT_EQ(normalize_sha256("").status().code(), Code::kInvalidArgument);
}

TEST(JobIdFromPath, ReadsTrailingNumber) {
  EXPECT_EQ(job_id_from_path("/org/nodemanager/NodeManager1/job/17"), 17u);
  EXPECT_EQ(job_id_from_path("/org/nodemanager/NodeManager1/job/x"), std::nullopt);
  EXPECT_EQ(job_id_from_path("/org/nodemanager/NodeManager1/job/"), std::nullopt);
  EXPECT_EQ(job_id_from_path("17"), std::nullopt);
}

TEST(RenderTable, AlignsColumnsToWidestCellWithoutTrailingBlanks) {
  const std::string t = render_table({"A", "LONGER"}, {{"wide-cell", "x"}, {"b", ""}});
  EXPECT_EQ(t,
            "A          LONGER\n"
            "wide-cell  x\n"
            "b\n");
}

TEST(VmListTable, HasTheDocumentedColumns) {
  const std::vector<VmRow> vms = {
      {.id = "11111111-1111-4111-8111-111111111111",
       .name = "web-1",
       .tenant = "contoso",
       .state = "running",
       .generation = 3,
       .observed_generation = 3},
      {.id = "22222222-2222-4222-8222-222222222222",
       .name = "db",
       .tenant = "fabrikam",
       .state = "shutoff",
       .generation = 12,
       .observed_generation = 11},
  };
  EXPECT_EQ(vm_list_table(vms),
            "ID                                    NAME   TENANT    STATE    GEN\n"
            "11111111-1111-4111-8111-111111111111  web-1  contoso   running  3\n"
            "22222222-2222-4222-8222-222222222222  db     fabrikam  shutoff  12\n");
}

TEST(VmListTable, EmptyListPrintsHeaderOnly) {
  EXPECT_EQ(vm_list_table({}), "ID  NAME  TENANT  STATE  GEN\n");
}

TEST(VmListJson, IsAnArrayOfObjects) {
  const json j = json::parse(vm_list_json({{.id = "i",
                                            .name = "n",
                                            .tenant = "t",
                                            .state = "running",
                                            .generation = 2,
                                            .observed_generation = 1}}));
  ASSERT_TRUE(j.is_array());
  ASSERT_EQ(j.size(), 1u);
  EXPECT_EQ(j[0]["id"], "i");
  EXPECT_EQ(j[0]["name"], "n");
  EXPECT_EQ(j[0]["tenant"], "t");
  EXPECT_EQ(j[0]["state"], "running");
  EXPECT_EQ(j[0]["generation"], 2);
  EXPECT_EQ(j[0]["observed_generation"], 1);
  EXPECT_EQ(json::parse(vm_list_json({})), json::array());
}

TEST(VmShow, TextFlattensSpecAndAlignsKeys) {
  const std::string doc =
      R"({"id":"abc","spec":{"name":"web-1","vcpus":2},"state":"running","generation":4})";
  EXPECT_EQ(vm_show_text(doc),
            "generation: 4\n"
            "id:         abc\n"
            "spec.name:  web-1\n"
            "spec.vcpus: 2\n"
            "state:      running\n");
}

TEST(VmShow, JsonIsTheDocumentOnOneLine) {
  const std::string doc = "{\n  \"id\": \"abc\",\n  \"state\": \"running\"\n}";
  const std::string out = vm_show_json(doc);
  EXPECT_EQ(out.find('\n'), std::string::npos);
  EXPECT_EQ(json::parse(out), json::parse(doc));
  EXPECT_EQ(vm_show_json("not json"), "not json");
}

constexpr uint64_t kNow = 1700000000000000;  // 2023-11-14T22:13:20Z
const std::string kDigestA =
    "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const std::string kDigestB =
    "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

TEST(HumanBytes, PicksTheLargestUnitAtLeastOne) {
  EXPECT_EQ(human_bytes(0), "0 B");
  EXPECT_EQ(human_bytes(1023), "1023 B");
  EXPECT_EQ(human_bytes(1024), "1.0 KiB");
  EXPECT_EQ(human_bytes(1536), "1.5 KiB");
  EXPECT_EQ(human_bytes(uint64_t{1} << 30), "1.0 GiB");
  EXPECT_EQ(human_bytes((uint64_t{5} << 40) / 2), "2.5 TiB");
}

TEST(ShortDigest, KeepsPrefixAndTwelveHexDigits) {
  EXPECT_EQ(short_digest(kDigestA), "sha256:0123456789ab");
  EXPECT_EQ(short_digest("sha256:abc"), "sha256:abc");
  EXPECT_EQ(short_digest("busybox:1"), "busybox:1");
}

TEST(RelativeTime, AgesThenDates) {
  EXPECT_EQ(relative_time(0, kNow), "never");
  EXPECT_EQ(relative_time(kNow - 59'000'000, kNow), "just now");
  EXPECT_EQ(relative_time(kNow - 5 * 60'000'000ULL, kNow), "5m ago");
  EXPECT_EQ(relative_time(kNow - 3 * 3600'000'000ULL, kNow), "3h ago");
  EXPECT_EQ(relative_time(kNow - 29 * 86400'000'000ULL, kNow), "29d ago");
  EXPECT_EQ(relative_time(kNow - 30 * 86400'000'000ULL, kNow), "2023-10-15");
  EXPECT_EQ(relative_time(kNow + 86400'000'000ULL, kNow), "2023-11-15");  // clock skew
  EXPECT_EQ(relative_time(kNow + 1'000'000, kNow), "just now");
}

TEST(UsersCell, NamesWhenShortElseACount) {
  EXPECT_EQ(users_cell({}), "-");
  EXPECT_EQ(users_cell({"web-1", "db-1"}), "web-1,db-1");
  EXPECT_EQ(users_cell({"web-frontend-1", "web-frontend-2"}), "2 VMs");
}

TEST(ImageList, TableHasTheDocumentedColumns) {
  const std::vector<ImageRow> images = {
      {.ref = "debian:12",
       .digest = kDigestA,
       .kind = "disk",
       .format = "qcow2",
       .size = uint64_t{1} << 30,
       .virtual_size = uint64_t{8} << 30,
       .tenant = "",
       .last_used_us = kNow - 7200'000'000ULL,
       .pinned = true,
       .users = {"web-1", "web-2"}},
      {.ref = "",
       .digest = kDigestB,
       .kind = "kernel",
       .format = "raw",
       .size = 512,
       .virtual_size = 512,
       .tenant = "contoso",
       .last_used_us = 0,
       .pinned = false,
       .users = {}},
  };
  EXPECT_EQ(
      image_list_table(images, kNow),
      "IMAGE      DIGEST               KIND    FORMAT  SIZE     USERS        LAST-USED  "
      "PINNED\n"
      "debian:12  sha256:0123456789ab  disk    qcow2   1.0 GiB  web-1,web-2  2h ago     yes\n"
      "-          sha256:fedcba987654  kernel  raw     512 B    -            never      no\n");
  const json j = json::parse(image_list_json(images));
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0]["image"], "debian:12");
  EXPECT_EQ(j[0]["digest"], kDigestA);
  EXPECT_EQ(j[0]["kind"], "disk");
  EXPECT_EQ(j[0]["format"], "qcow2");
  EXPECT_EQ(j[0]["size"], uint64_t{1} << 30);
  EXPECT_EQ(j[0]["virtual_size"], uint64_t{8} << 30);
  EXPECT_EQ(j[0]["tenant"], "");
  EXPECT_EQ(j[0]["last_used_us"], kNow - 7200'000'000ULL);
  EXPECT_EQ(j[0]["pinned"], true);
  EXPECT_EQ(j[0]["users"], json({"web-1", "web-2"}));
  EXPECT_EQ(j[1]["image"], "");
  EXPECT_EQ(j[1]["tenant"], "contoso");
  EXPECT_EQ(j[1]["pinned"], false);
  EXPECT_EQ(j[1]["users"], json::array());
  EXPECT_EQ(json::parse(image_removed_json("busybox:1"))["removed"], "busybox:1");
}

TEST(ParseImageList, SkipsBlanksAndComments) {
  EXPECT_EQ(
      parse_image_list("# warm-up list\n"
                       "debian:12\n"
                       "\n"
                       "  ubuntu:24.04   # LTS\n"
                       "alpine:3 busybox:1\r\n"
                       "#all:commented\n"
                       "last:1"),
      (std::vector<std::string>{"debian:12", "ubuntu:24.04", "alpine:3", "busybox:1", "last:1"}));
  EXPECT_TRUE(parse_image_list("").empty());
  EXPECT_TRUE(parse_image_list("\n# only comments\n   \n").empty());
}

TEST(PerImageRequestId, DerivedOnlyForSeveralImages) {
  EXPECT_EQ(per_image_request_id("warm-7", "debian:12", false), "warm-7");
  EXPECT_EQ(per_image_request_id("warm-7", "debian:12", true), "warm-7:debian:12");
  EXPECT_EQ(per_image_request_id("", "debian:12", true), "");
}

TEST(PullResult, LinesForPeople) {
  EXPECT_EQ(pull_result_line({.image = "debian:12",
                              .job_id = 7,
                              .result = "done",
                              .digest = kDigestA,
                              .size = uint64_t{1} << 30}),
            "pulled debian:12 sha256:0123456789ab (1.0 GiB)");
  EXPECT_EQ(pull_result_line({.image = "debian:12", .job_id = 7, .result = "queued"}),
            "pull debian:12: job 7 queued");
  EXPECT_EQ(pull_result_line({.image = "nope:1",
                              .job_id = 8,
                              .result = "failed",
                              .error = not_found("image 'nope:1' is in no image store")}),
            "pull 'nope:1' failed: image 'nope:1' is in no image store");
}

TEST(PullResult, JsonHasJobResultAndErrorOrDigest) {
  const json j = json::parse(pull_results_json(
      {{.image = "debian:12", .job_id = 7, .result = "done", .digest = kDigestA, .size = 10},
       {.image = "bad ref", .result = "failed", .error = invalid_argument("image: bad")}}));
  ASSERT_EQ(j.size(), 2u);
  EXPECT_EQ(j[0]["image"], "debian:12");
  EXPECT_EQ(j[0]["job_id"], 7);
  EXPECT_EQ(j[0]["result"], "done");
  EXPECT_EQ(j[0]["digest"], kDigestA);
  EXPECT_EQ(j[0]["size"], 10);
  EXPECT_FALSE(j[0].contains("error"));
  EXPECT_TRUE(j[1]["job_id"].is_null());
  EXPECT_EQ(j[1]["result"], "failed");
  EXPECT_EQ(j[1]["error"], "InvalidArgument");
  EXPECT_EQ(j[1]["message"], "image: bad");
  EXPECT_FALSE(j[1].contains("digest"));
}

TEST(PullExitCode, ZeroOnlyWhenAllSucceeded) {
  const PullOutcome ok{.image = "a:1", .job_id = 1, .result = "done"};
  const PullOutcome missing{
      .image = "b:1", .job_id = 2, .result = "failed", .error = not_found("x")};
  const PullOutcome missing2{
      .image = "c:1", .job_id = 3, .result = "failed", .error = not_found("y")};
  const PullOutcome down{.image = "d:1", .result = "failed", .error = unavailable("z")};
  EXPECT_EQ(pull_exit_code({ok}), 0);
  EXPECT_EQ(pull_exit_code({ok, {.image = "q:1", .job_id = 4, .result = "queued"}}), 0);
  EXPECT_EQ(pull_exit_code({ok, missing}), 1);
  EXPECT_EQ(pull_exit_code({missing, missing2}), 3);
  EXPECT_EQ(pull_exit_code({down}), 5);
  EXPECT_EQ(pull_exit_code({missing, down}), 1);
  EXPECT_EQ(pull_exit_code({{.image = "e:1",
                             .job_id = 5,
                             .result = "cancelled",
                             .error = internal_error("job 5 (pull) cancelled")}}),
            1);
}

TEST(ImagePin, Json) {
  const json j = json::parse(image_pinned_json("debian:12", true));
  EXPECT_EQ(j["image"], "debian:12");
  EXPECT_EQ(j["pinned"], true);
  EXPECT_EQ(json::parse(image_pinned_json("debian:12", false))["pinned"], false);
}

TEST(ImageGc, TextTableAndTotal) {
  const GcReply gc{
      .removed = {{.digest = kDigestA, .tags = {"debian:11", "debian:old"}, .size = 1536},
                  {.digest = kDigestB, .tags = {}, .size = uint64_t{1} << 30}},
      .bytes = 1536 + (uint64_t{1} << 30)};
  EXPECT_EQ(image_gc_text(gc, false),
            "DIGEST               TAGS                  SIZE\n"
            "sha256:0123456789ab  debian:11,debian:old  1.5 KiB\n"
            "sha256:fedcba987654  -                     1.0 GiB\n"
            "removed 2 images, 1.0 GiB\n");
  EXPECT_NE(image_gc_text(gc, true).find("would remove 2 images, 1.0 GiB (dry run)\n"),
            std::string::npos);
  EXPECT_EQ(image_gc_text({}, false), "nothing to collect\n");
  EXPECT_EQ(image_gc_text({}, true), "nothing to collect (dry run)\n");
}

TEST(ImageGc, Json) {
  const json j = json::parse(image_gc_json(
      {.removed = {{.digest = kDigestA, .tags = {"debian:11"}, .size = 5}}, .bytes = 5}, true));
  EXPECT_EQ(j["dry_run"], true);
  EXPECT_EQ(j["bytes"], 5);
  ASSERT_EQ(j["removed"].size(), 1u);
  EXPECT_EQ(j["removed"][0]["digest"], kDigestA);
  EXPECT_EQ(j["removed"][0]["tags"], json({"debian:11"}));
  EXPECT_EQ(j["removed"][0]["size"], 5);
  EXPECT_EQ(json::parse(image_gc_json({}, false))["removed"], json::array());
}

EventRow verified(uint64_t seq, uint32_t job, uint64_t checked, uint64_t corrupt) {
  return {.seq = seq,
          .kind = "ImageVerified",
          .object_id = "images",
          .payload_json = json{{"job_id", job}, {"checked", checked}, {"corrupt", corrupt}}.dump()};
}
EventRow corrupt_event(uint64_t seq, const std::string& digest, const std::string& problem) {
  return {.seq = seq,
          .kind = "ImageCorrupt",
          .object_id = digest,
          .payload_json = json{{"digest", digest}, {"problem", problem}}.dump()};
}

TEST(VerifyReport, TakesTheCorruptEventsJustBeforeItsJobsVerified) {
  const std::vector<EventRow> events = {
      corrupt_event(1, kDigestB, "an older run's finding"),
      verified(2, 4, 3, 1),
      {.seq = 3, .kind = "JobRemoved", .object_id = "4", .payload_json = "{}"},
      corrupt_event(4, kDigestA, "sha256 mismatch"),
      verified(5, 9, 2, 1),
      corrupt_event(6, kDigestB, "a later run's finding"),
      verified(7, 10, 2, 1),
  };
  const auto r = verify_report_from_events(events, 9);
  ASSERT_TRUE(r.has_value());
  EXPECT_EQ(r->checked, 2u);
  ASSERT_EQ(r->corrupt.size(), 1u);
  EXPECT_EQ(r->corrupt[0].digest, kDigestA);
  EXPECT_EQ(r->corrupt[0].problem, "sha256 mismatch");
  const auto clean = verify_report_from_events({verified(1, 3, 5, 0)}, 3);
  ASSERT_TRUE(clean.has_value());
  EXPECT_EQ(clean->checked, 5u);
  EXPECT_TRUE(clean->corrupt.empty());
  EXPECT_FALSE(verify_report_from_events(events, 11).has_value());
}

TEST(VerifyReport, TextAndJsonWithTags) {
  VerifyReport r{.checked = 3,
                 .corrupt = {{.digest = kDigestA, .tags = {}, .problem = "sha256 mismatch"}}};
  add_tags({{.ref = "debian:12", .digest = kDigestA},
            {.ref = "other:1", .digest = kDigestB},
            {.ref = "debian:stable", .digest = kDigestA},
            {.ref = "", .digest = kDigestA}},
           &r);
  EXPECT_EQ(r.corrupt[0].tags, (std::vector<std::string>{"debian:12", "debian:stable"}));
  EXPECT_EQ(verify_report_text(r), "corrupt: " + kDigestA +
                                       " (debian:12, debian:stable): sha256 mismatch\n"
                                       "checked 3 images: 1 corrupt\n");
  EXPECT_EQ(verify_report_text({.checked = 1}), "checked 1 image: all intact\n");
  EXPECT_EQ(verify_report_text({.checked = 4}), "checked 4 images: all intact\n");
  const json j = json::parse(verify_report_json(r));
  EXPECT_EQ(j["checked"], 3);
  ASSERT_EQ(j["corrupt"].size(), 1u);
  EXPECT_EQ(j["corrupt"][0]["digest"], kDigestA);
  EXPECT_EQ(j["corrupt"][0]["tags"], json({"debian:12", "debian:stable"}));
  EXPECT_EQ(j["corrupt"][0]["problem"], "sha256 mismatch");
  EXPECT_EQ(json::parse(verify_report_json({.checked = 2}))["corrupt"], json::array());
}

TEST(Progress, BarShowsFillAmountsAndPercent) {
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  EXPECT_EQ(progress_bar("debian:12", 12, 512 * kMiB, 1024 * kMiB),
            "debian:12     [##########----------]  512.0/1024.0 MiB   50%");
  EXPECT_EQ(progress_bar("a:1", 3, 1024 * kMiB, 1024 * kMiB),
            "a:1  [####################]  1024.0/1024.0 MiB  100%");
  EXPECT_EQ(progress_bar("a:1", 3, 0, 0), "a:1  [--------------------]  waiting");
  EXPECT_EQ(progress_bar("a:1", 3, 3 * kMiB, 0), "a:1  [--------------------]  3072.0 KiB");
  EXPECT_EQ(progress_bar("a:1", 3, 999, 1000), "a:1  [###################-]  999.0/1000.0 B   99%");
  EXPECT_EQ(progress_bar(std::string(50, 'x'), 50, 0, 0).find("  ["), 40u);
}

TEST(Progress, PlainLines) {
  constexpr uint64_t kMiB = uint64_t{1} << 20;
  EXPECT_EQ(progress_plain("pull debian:12", 512 * kMiB, 1024 * kMiB),
            "pull debian:12: 512/1024 MiB");
  EXPECT_EQ(progress_plain("verify", 5 * kMiB, 0), "verify: 5120 KiB");
  EXPECT_EQ(progress_plain("pull big:1", uint64_t{10} << 30, uint64_t{20} << 30),
            "pull big:1: 10/20 GiB");
}

TEST(Progress, RedrawMovesUpOverTheOldLinesAndClearsThem) {
  EXPECT_EQ(redraw_lines({"a", "b"}, 0), "\ra\x1b[K\n\rb\x1b[K\n");
  EXPECT_EQ(redraw_lines({"a", "b"}, 2), "\x1b[2A\ra\x1b[K\n\rb\x1b[K\n");
  EXPECT_EQ(redraw_lines({"a"}, 2), "\x1b[2A\ra\x1b[K\n\r\x1b[K\n");
  EXPECT_EQ(erase_lines(3), "\x1b[3A\r\x1b[J");
  EXPECT_EQ(erase_lines(0), "");
}

TEST(Progress, PlainGateEveryTenPercentOrFiveSeconds) {
  using std::chrono::seconds;
  const PlainProgressGate::TimePoint t0{};
  PlainProgressGate g;
  EXPECT_FALSE(g.due(0, 1000, t0));  // nothing moved yet
  EXPECT_TRUE(g.due(10, 1000, t0));  // the first bytes
  EXPECT_FALSE(g.due(50, 1000, t0 + seconds(1)));
  EXPECT_FALSE(g.due(109, 1000, t0 + seconds(2)));
  EXPECT_TRUE(g.due(110, 1000, t0 + seconds(2)));    // 10% more
  EXPECT_FALSE(g.due(120, 1000, t0 + seconds(6)));   // 5 s after the first, but 4 s after the last
  EXPECT_TRUE(g.due(130, 1000, t0 + seconds(7)));    // 5 s since the last line
  EXPECT_FALSE(g.due(130, 1000, t0 + seconds(20)));  // no new bytes, no line
  PlainProgressGate unknown;
  EXPECT_TRUE(unknown.due(1, 0, t0));
  EXPECT_FALSE(unknown.due(1'000'000, 0, t0 + seconds(4)));
  EXPECT_TRUE(unknown.due(2'000'000, 0, t0 + seconds(5)));
}

TEST(Events, LineShowsSeqUtcTimeKindObjectAndPayload) {
  const EventRow e{.seq = 7,
                   .ts_us = 1700000000123456,
                   .kind = "VmStateChanged",
                   .object_id = "abc",
                   .payload_json = R"({"state":"running"})"};
  EXPECT_EQ(event_line(e),
            R"(7  2023-11-14T22:13:20.123Z  VmStateChanged  abc  {"state":"running"})");
}

TEST(Events, JsonEmbedsParsedPayloadOrRawText) {
  const json j = json::parse(event_json(
      {.seq = 7, .ts_us = 5, .kind = "K", .object_id = "o", .payload_json = R"({"a":1})"}));
  EXPECT_EQ(j["seq"], 7);
  EXPECT_EQ(j["ts_us"], 5);
  EXPECT_EQ(j["payload"]["a"], 1);
  const json raw = json::parse(
      event_json({.seq = 1, .ts_us = 0, .kind = "K", .object_id = "o", .payload_json = "{oops"}));
  EXPECT_EQ(raw["payload"], "{oops");
  const json arr = json::parse(events_json({{.seq = 1}, {.seq = 2}}));
  ASSERT_EQ(arr.size(), 2u);
  EXPECT_EQ(arr[1]["seq"], 2);
}

TEST(JobOutcomeFromEvent, MatchesOnPayloadJobIdOrPath) {
  const std::string path = "/org/nodemanager/NodeManager1/job/9";
  JobOutcome o;
  EXPECT_TRUE(job_outcome_from_event(
      {.seq = 3,
       .kind = "JobRemoved",
       .object_id = "vm-1",
       .payload_json =
           R"({"job_id":9,"kind":"create","result":"failed","error_name":"org.nodemanager.NodeManager1.Error.Unavailable","error_message":"libvirt down"})"},
      9, path, &o));
  EXPECT_EQ(o.result, "failed");
  EXPECT_EQ(o.kind, "create");
  EXPECT_EQ(o.error_message, "libvirt down");
  EXPECT_TRUE(job_outcome_from_event(
      {.kind = "JobRemoved", .payload_json = R"({"job":")" + path + R"(","result":"done"})"}, 9,
      path, &o));
  EXPECT_EQ(o.result, "done");
  // The daemon's own shape: object_id is the job id, payload {"job": id, "error", "message"}.
  EXPECT_TRUE(job_outcome_from_event(
      {.kind = "JobRemoved",
       .object_id = "9",
       .payload_json =
           R"({"job":9,"kind":"delete","object_id":"v","result":"failed","error":"Conflict","message":"busy"})"},
      9, path, &o));
  EXPECT_EQ(o.result, "failed");
  EXPECT_EQ(o.error_name, "Conflict");
  EXPECT_EQ(o.error_message, "busy");
  EXPECT_EQ(job_status(o).code(), Code::kConflict);
}

TEST(JobOutcomeFromEvent, IgnoresOtherJobsAndKinds) {
  const std::string path = "/org/nodemanager/NodeManager1/job/9";
  JobOutcome o;
  EXPECT_FALSE(job_outcome_from_event(
      {.kind = "JobRemoved", .payload_json = R"({"job_id":10,"result":"done"})"}, 9, path, &o));
  EXPECT_FALSE(job_outcome_from_event(
      {.kind = "VmStateChanged", .object_id = "9", .payload_json = "{}"}, 9, path, &o));
}

TEST(JobStatus, DoneIsOkFailedCarriesTheDaemonsError) {
  EXPECT_TRUE(job_status({.result = "done"}).is_ok());
  EXPECT_TRUE(job_status({.result = "unknown"}).is_ok());
  const Status failed = job_status({.job_id = 4,
                                    .kind = "start",
                                    .result = "failed",
                                    .error_name = "org.nodemanager.NodeManager1.Error.Conflict",
                                    .error_message = "busy"});
  EXPECT_EQ(failed.code(), Code::kConflict);
  EXPECT_EQ(failed.message(), "job 4 (start) failed: busy");
  EXPECT_EQ(job_status({.result = "cancelled"}).code(), Code::kInternal);
  EXPECT_EQ(job_status({.result = "failed", .error_name = "NotFound"}).code(), Code::kNotFound);
}

TEST(JobReply, TextAndJsonWithoutAndWithOutcome) {
  JobReply r{.verb = "create",
             .vm_id = "abc",
             .vm_path = "/org/nodemanager/NodeManager1/vm/abc",
             .job = "/org/nodemanager/NodeManager1/job/5"};
  EXPECT_EQ(job_reply_text(r), "vm abc\njob 5 (/org/nodemanager/NodeManager1/job/5) queued\n");
  json j = json::parse(job_reply_json(r));
  EXPECT_EQ(j["vm_id"], "abc");
  EXPECT_EQ(j["job_id"], 5);
  EXPECT_FALSE(j.contains("result"));
  r.outcome = JobOutcome{.result = "failed",
                         .error_name = "org.nodemanager.NodeManager1.Error.Unavailable",
                         .error_message = "libvirt down"};
  EXPECT_EQ(job_reply_text(r), "vm abc\njob 5 create failed\n");
  j = json::parse(job_reply_json(r));
  EXPECT_EQ(j["result"], "failed");
  EXPECT_EQ(j["error"], "Unavailable");
  EXPECT_EQ(j["message"], "libvirt down");
}

TEST(NodeHealth, ExitCodesAndOutput) {
  EXPECT_EQ(health_exit_code("ok"), 0);
  EXPECT_EQ(health_exit_code("degraded"), 8);
  EXPECT_EQ(health_exit_code("failed"), 9);
  EXPECT_EQ(health_exit_code("something-new"), 9) << "unknown is not healthy";
  const HealthReply h{.state = "failed",
                      .maintenance = true,
                      .maintenance_reason = "disk swap",
                      .heartbeat_seq = 7,
                      .checks = {{.name = "uplink",
                                  .state = "failed",
                                  .reason = "interface 'eth1' has no carrier",
                                  .vm_id = "",
                                  .changed_us = 1'000'000}}};
  const std::string text = health_text(h, 1'000'000);
  EXPECT_NE(text.find("node: failed (maintenance: disk swap; new VMs refused)"), std::string::npos)
      << text;
  EXPECT_NE(text.find("uplink"), std::string::npos);
  EXPECT_NE(text.find("just now"), std::string::npos);
  const json j = json::parse(health_json(h));
  EXPECT_EQ(j["state"], "failed");
  EXPECT_EQ(j["heartbeat_seq"], 7);
  EXPECT_EQ(j["checks"][0]["reason"], "interface 'eth1' has no carrier");
}

TEST(NodeCapacity, TableAndJsonShowFree) {
  const std::vector<CapacityRow> rows = {{.resource = "vcpus",
                                          .total = 16,
                                          .reserved = 2,
                                          .ratio = 4.0,
                                          .capacity = 56,
                                          .allocated = 60}};
  const std::string t = capacity_table(rows);
  EXPECT_NE(t.find("RESOURCE"), std::string::npos);
  EXPECT_NE(t.find("vcpus"), std::string::npos);
  const json j = json::parse(capacity_json(rows));
  EXPECT_EQ(j[0]["free"], 0) << "over-allocated (ratio lowered) shows 0 free, not a wrap-around";
  EXPECT_EQ(j[0]["ratio"], 4.0);
}

TEST(NodeWatch, OneJsonObjectPerSignal) {
  const json hb = json::parse(node_signal_json(HeartbeatSignal{
      .seq = 3, .timestamp_us = 5, .state = "ok", .maintenance = false, .summary = {{"vms", 2}}}));
  EXPECT_EQ(hb["signal"], "Heartbeat");
  EXPECT_EQ(hb["summary"]["vms"], 2);
  const json hc = json::parse(node_signal_json(HealthChangedSignal{
      .seq = 9,
      .state = "degraded",
      .previous_state = "ok",
      .maintenance = false,
      .changed =
          {{.name = "vm:x", .state = "failed", .reason = "r", .vm_id = "x", .changed_us = 1}},
      .vms_affected = {"x"}}));
  EXPECT_EQ(hc["signal"], "HealthChanged");
  EXPECT_EQ(hc["changed"][0]["vm_id"], "x");
  EXPECT_EQ(hc["vms_affected"][0], "x");
  const NodeSignal vm = VmStateSignal{
      .seq = 4, .vm_id = "x", .name = "web", .state = "crashed", .reason = "QEMU process gone"};
  EXPECT_EQ(json::parse(node_signal_json(vm))["state"], "crashed");
  EXPECT_EQ(node_signal_text(vm), "vm 4: web (x) crashed: QEMU process gone");
}

}  // namespace
}  // namespace nm::cli
