// Status and Result<T>: errors as values.
//
// Every fallible function in nodemanager returns a Status or a Result<T>. The code enum is closed
// and maps one-to-one onto the D-Bus error names `org.nodemanager.NodeManager1.Error.<Name>`
// (see code_name()). Messages are for people: they name the field or object and the rule, and
// quote user-controlled strings in single quotes.
#pragma once

#include <cassert>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <variant>

namespace nm {

enum class Code {
  kOk = 0,
  kInvalidArgument,       // the caller's input breaks a rule; nothing was changed
  kNotFound,              // the named object does not exist
  kAlreadyExists,         // an object with that identity exists
  kConflict,              // the object's current state forbids the operation (in use, busy...)
  kQuotaExceeded,         // a per-tenant limit would be exceeded
  kInsufficientCapacity,  // the host lacks the resources
  kUnavailable,           // a dependency (libvirt, the database, the disk) is not usable now
  kAccessDenied,          // the caller may not do this
  kInternal,              // a bug or an unexpected environment; see the log
};

// "InvalidArgument", "NotFound"... : the suffix of the D-Bus error name.
std::string_view code_name(Code code);
// Inverse of code_name(); kInternal for unknown names.
Code code_from_name(std::string_view name);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message) : code_(code), message_(std::move(message)) {}

  static Status ok() { return {}; }

  bool is_ok() const { return code_ == Code::kOk; }
  explicit operator bool() const { return is_ok(); }
  Code code() const { return code_; }
  const std::string& message() const { return message_; }
  // "NotFound: vm 'web-1' does not exist"
  std::string to_string() const;

  // Returns a copy whose message is "<context>: <message>".
  Status with_context(std::string_view context) const;

 private:
  Code code_ = Code::kOk;
  std::string message_;
};

inline Status invalid_argument(std::string m) {
  return {Code::kInvalidArgument, std::move(m)};
}
inline Status not_found(std::string m) {
  return {Code::kNotFound, std::move(m)};
}
inline Status already_exists(std::string m) {
  return {Code::kAlreadyExists, std::move(m)};
}
inline Status conflict(std::string m) {
  return {Code::kConflict, std::move(m)};
}
inline Status unavailable(std::string m) {
  return {Code::kUnavailable, std::move(m)};
}
inline Status internal_error(std::string m) {
  return {Code::kInternal, std::move(m)};
}

// A value or a non-OK Status. GCC 12's std::expected is partial and clang 14 has none.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}        // NOLINT(google-explicit-constructor)
  Result(Status status) : v_(std::move(status)) {  // NOLINT(google-explicit-constructor)
    assert(!std::get<Status>(v_).is_ok() && "Result built from an OK Status");
  }

  bool is_ok() const { return std::holds_alternative<T>(v_); }
  explicit operator bool() const { return is_ok(); }

  const T& value() const& { return std::get<T>(v_); }
  T& value() & { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  const T& operator*() const& { return value(); }
  T& operator*() & { return value(); }
  const T* operator->() const { return &value(); }
  T* operator->() { return &value(); }

  // The error; Status::ok() when a value is held.
  Status status() const { return is_ok() ? Status::ok() : std::get<Status>(v_); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace nm

#define NM_CONCAT_INNER(a, b) a##b
#define NM_CONCAT(a, b) NM_CONCAT_INNER(a, b)

// Evaluates a Status expression and returns it from the enclosing function when not OK.
#define NM_RETURN_IF_ERROR(expr) NM_RETURN_IF_ERROR_IMPL(NM_CONCAT(nm_status_, __LINE__), expr)
#define NM_RETURN_IF_ERROR_IMPL(tmp, expr) \
  do {                                     \
    ::nm::Status tmp = (expr);             \
    if (!tmp.is_ok()) return tmp;          \
  } while (0)
#define NM_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                             \
  if (!tmp.is_ok()) return tmp.status();         \
  lhs = std::move(tmp).value()
// `NM_ASSIGN_OR_RETURN(auto x, f());` declares x from a Result or returns its Status.
#define NM_ASSIGN_OR_RETURN(lhs, expr) \
  NM_ASSIGN_OR_RETURN_IMPL(NM_CONCAT(nm_result_, __LINE__), lhs, expr)
