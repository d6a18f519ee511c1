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

TEST(ImageList, TableAndJson) {
  const std::vector<ImageRow> images = {{.ref = "busybox:1",
                                         .digest = "sha256:ab",
                                         .kind = "disk",
                                         .format = "raw",
                                         .size = 10,
                                         .virtual_size = 20,
                                         .tenant = ""}};
  EXPECT_EQ(image_list_table(images),
            "IMAGE      DIGEST     KIND  FORMAT  SIZE  VSIZE  TENANT\n"
            "busybox:1  sha256:ab  disk  raw     10    20     -\n");
  const json j = json::parse(image_list_json(images));
  EXPECT_EQ(j[0]["image"], "busybox:1");
  EXPECT_EQ(j[0]["virtual_size"], 20);
  EXPECT_EQ(j[0]["tenant"], "");
  EXPECT_EQ(json::parse(image_removed_json("busybox:1"))["removed"], "busybox:1");
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

}  // namespace
}  // namespace nm::cli
