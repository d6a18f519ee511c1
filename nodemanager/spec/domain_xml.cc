#include "nm/domain_xml.h"

#include <algorithm>
#include <charconv>
#include <initializer_list>
#include <system_error>
#include <utility>
#include <vector>

namespace nm {

std::string xml_escape(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&':
        out += "&amp;";
        break;
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '"':
        out += "&quot;";
        break;
      case '\'':
        out += "&apos;";
        break;
      case '\t':
        out += "&#9;";
        break;
      case '\n':
        out += "&#10;";
        break;
      case '\r':
        out += "&#13;";
        break;
      default:
        out += static_cast<unsigned char>(c) < 0x20 ? '?' : c;
    }
  }
  return out;
}
namespace {

// Escapes text for both element content and attribute values. Characters XML 1.0 cannot carry
// at all (C0 controls other than tab, newline and carriage return) become '?'.

using Attrs = std::initializer_list<std::pair<std::string_view, std::string_view>>;

// A minimal indenting XML writer. Element and attribute names are our constants; every value
// goes through xml_escape().
class XmlWriter {
 public:
  void open(std::string_view name, Attrs attrs = {}) {
    start_tag(name, attrs);
    out_ += ">\n";
    stack_.emplace_back(name);
  }
  void close() {
    const std::string name = std::move(stack_.back());
    stack_.pop_back();
    indent();
    out_ += "</" + name + ">\n";
  }
  void empty(std::string_view name, Attrs attrs = {}) {
    start_tag(name, attrs);
    out_ += "/>\n";
  }
  void text(std::string_view name, std::string_view value, Attrs attrs = {}) {
    start_tag(name, attrs);
    out_ += ">" + xml_escape(value) + "</" + std::string(name) + ">\n";
  }
  std::string take() { return std::move(out_); }

 private:
  void indent() { out_.append(2 * stack_.size(), ' '); }
  void start_tag(std::string_view name, Attrs attrs) {
    indent();
    out_ += "<";
    out_ += name;
    for (const auto& [k, v] : attrs) {
      out_ += " ";
      out_ += k;
      out_ += "='" + xml_escape(v) + "'";
    }
  }

  std::string out_;
  std::vector<std::string> stack_;
};

// --- parse_owner_metadata: a small, strict reader for one XML start tag. ---

bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}
bool is_name_char(char c) {
  return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '_' ||
         c == '-' || c == '.' || c == ':';
}

class TagReader {
 public:
  explicit TagReader(std::string_view s) : s_(s) {}

  void skip_space() {
    while (pos_ < s_.size() && is_space(s_[pos_])) ++pos_;
  }
  bool consume(std::string_view lit) {
    if (s_.substr(pos_).starts_with(lit)) {
      pos_ += lit.size();
      return true;
    }
    return false;
  }
  std::string_view name() {
    const size_t start = pos_;
    while (pos_ < s_.size() && is_name_char(s_[pos_])) ++pos_;
    return s_.substr(start, pos_ - start);
  }
  // A quoted attribute value, either quote style, with the five predefined entities decoded.
  std::optional<std::string> quoted() {
    if (pos_ >= s_.size() || (s_[pos_] != '"' && s_[pos_] != '\'')) return std::nullopt;
    const char q = s_[pos_++];
    const size_t end = s_.find(q, pos_);
    if (end == std::string_view::npos) return std::nullopt;
    const std::string_view raw = s_.substr(pos_, end - pos_);
    pos_ = end + 1;
    return unescape(raw);
  }
  void skip(size_t n) { pos_ = std::min(s_.size(), pos_ + n); }
  bool at_end() const { return pos_ >= s_.size(); }
  std::string_view rest() const { return s_.substr(pos_); }

 private:
  static std::optional<std::string> unescape(std::string_view raw) {
    static constexpr std::pair<std::string_view, char> kEntities[] = {
        {"&amp;", '&'}, {"&lt;", '<'}, {"&gt;", '>'}, {"&quot;", '"'}, {"&apos;", '\''}};
    std::string out;
    for (size_t i = 0; i < raw.size();) {
      if (raw[i] == '<') return std::nullopt;
      if (raw[i] != '&') {
        out += raw[i++];
        continue;
      }
      bool matched = false;
      for (const auto& [entity, c] : kEntities) {
        if (raw.substr(i).starts_with(entity)) {
          out += c;
          i += entity.size();
          matched = true;
          break;
        }
      }
      if (!matched) return std::nullopt;
    }
    return out;
  }

  std::string_view s_;
  size_t pos_ = 0;
};

Status bad_metadata(std::string_view why) {
  return invalid_argument("metadata: " + std::string(why));
}

}  // namespace

std::string domain_name(const VmSpec& spec) {
  return "nm-" + spec.name.str();
}

std::string render_owner_metadata(const DomainOwner& owner) {
  return "<vm id=\"" + xml_escape(owner.vm_id.str()) + "\" tenant=\"" +
         xml_escape(owner.tenant.str()) + "\" generation=\"" + std::to_string(owner.generation) +
         "\"/>";
}

std::string render_domain_xml(const DomainXmlInput& in) {
  const std::string vcpus = std::to_string(in.spec.vcpus);
  const std::string memory = std::to_string(in.spec.memory_mib);
  const std::string meta_element = std::string(kMetadataPrefix) + ":vm";
  const std::string meta_xmlns = std::string("xmlns:") + kMetadataPrefix;
  const std::string generation = std::to_string(in.generation);

  XmlWriter w;
  w.open("domain", {{"type", in.domain_type}});
  w.text("name", domain_name(in.spec));
  w.text("uuid", in.id.str());
  w.open("metadata");
  w.empty(meta_element, {{meta_xmlns, kMetadataNamespace},
                         {"id", in.id.str()},
                         {"tenant", in.spec.tenant.str()},
                         {"generation", generation}});
  w.close();
  w.text("memory", memory, {{"unit", "MiB"}});
  w.text("vcpu", vcpus);
  w.open("os");
  w.text("type", "hvm", {{"arch", "x86_64"}, {"machine", in.machine}});
  if (in.kernel_path) {
    w.text("kernel", *in.kernel_path);
    if (in.initrd_path) w.text("initrd", *in.initrd_path);
    if (!in.spec.cmdline.empty()) w.text("cmdline", in.spec.cmdline);
  } else {
    w.empty("boot", {{"dev", "hd"}});
  }
  w.close();
  w.open("features");
  w.empty("acpi");
  w.empty("apic");
  w.close();
  w.text("on_poweroff", "destroy");
  w.text("on_reboot", "restart");
  w.text("on_crash", "destroy");
  w.open("devices");
  if (!in.disk_path.empty()) {
    w.open("disk", {{"type", "file"}, {"device", "disk"}});
    w.empty("driver", {{"name", "qemu"}, {"type", in.disk_format}});
    w.empty("source", {{"file", in.disk_path}});
    w.empty("target", {{"dev", "vda"}, {"bus", "virtio"}});
    w.close();
  }
  for (const auto& nic : in.interfaces) {
    w.open("interface", {{"type", "bridge"}});
    w.empty("mac", {{"address", nic.mac}});
    w.empty("source", {{"bridge", nic.bridge}});
    w.empty("target", {{"dev", nic.tap}});
    w.empty("model", {{"type", "virtio"}});
    w.close();
  }
  if (!in.serial_log_path.empty()) {
    w.open("serial", {{"type", "file"}});
    w.empty("source", {{"path", in.serial_log_path}});
    w.empty("target", {{"port", "0"}});
    w.close();
    w.open("console", {{"type", "file"}});
    w.empty("source", {{"path", in.serial_log_path}});
    w.empty("target", {{"type", "serial"}, {"port", "0"}});
    w.close();
  }
  w.empty("memballoon", {{"model", "none"}});
  w.close();
  w.close();
  return w.take();
}

Result<DomainOwner> parse_owner_metadata(std::string_view xml) {
  TagReader r(xml);
  r.skip_space();
  if (r.consume("<?xml")) {
    const auto end = r.rest().find("?>");
    if (end == std::string_view::npos) return bad_metadata("unterminated XML declaration");
    r.skip(end + 2);
    r.skip_space();
  }
  if (!r.consume("<")) return bad_metadata("expected an element");
  const std::string_view qname = r.name();
  const auto colon = qname.find(':');
  const std::string_view prefix =
      colon == std::string_view::npos ? std::string_view{} : qname.substr(0, colon);
  const std::string_view local = colon == std::string_view::npos ? qname : qname.substr(colon + 1);
  if (local != "vm") return bad_metadata("expected element 'vm', got '" + std::string(qname) + "'");

  std::optional<std::string> id, tenant, generation, ns;
  const std::string ns_attr = prefix.empty() ? "xmlns" : "xmlns:" + std::string(prefix);
  std::vector<std::string> seen;
  bool self_closing = false;
  while (true) {
    const bool had_space = !r.at_end() && is_space(r.rest().front());
    r.skip_space();
    if (r.consume("/>")) {
      self_closing = true;
      break;
    }
    if (r.consume(">")) break;
    if (r.at_end()) return bad_metadata("unterminated element");
    if (!had_space) return bad_metadata("expected whitespace between attributes");
    const std::string attr(r.name());
    if (attr.empty()) return bad_metadata("malformed attribute");
    r.skip_space();
    if (!r.consume("=")) return bad_metadata("attribute '" + attr + "' has no value");
    r.skip_space();
    auto value = r.quoted();
    if (!value) return bad_metadata("attribute '" + attr + "' has a malformed value");
    for (const auto& s : seen) {
      if (s == attr) return bad_metadata("attribute '" + attr + "' appears twice");
    }
    seen.push_back(attr);
    if (attr == "id") {
      id = std::move(value);
    } else if (attr == "tenant") {
      tenant = std::move(value);
    } else if (attr == "generation") {
      generation = std::move(value);
    } else if (attr == ns_attr) {
      ns = std::move(value);
    }
  }
  if (!self_closing) {
    r.skip_space();
    if (!r.consume("</") || r.name() != qname) return bad_metadata("expected an empty element");
    r.skip_space();
    if (!r.consume(">")) return bad_metadata("unterminated end tag");
  }
  r.skip_space();
  if (!r.at_end()) return bad_metadata("trailing content after the element");

  if (ns && *ns != kMetadataNamespace) return bad_metadata("namespace is not ours");
  if (!ns && !prefix.empty() && prefix != kMetadataPrefix) {
    return bad_metadata("undeclared namespace prefix");
  }
  if (!id) return bad_metadata("attribute 'id' is missing");
  if (!tenant) return bad_metadata("attribute 'tenant' is missing");
  if (!generation) return bad_metadata("attribute 'generation' is missing");

  NM_ASSIGN_OR_RETURN(VmId vm_id, VmId::parse(*id, "metadata.id"));
  NM_ASSIGN_OR_RETURN(TenantId tenant_id, TenantId::parse(*tenant, "metadata.tenant"));
  uint64_t gen = 0;
  const char* first = generation->data();
  const char* last = first + generation->size();
  const auto [end, ec] = std::from_chars(first, last, gen);
  if (generation->empty() || ec != std::errc{} || end != last) {
    return bad_metadata("attribute 'generation' is not an unsigned 64-bit integer");
  }
  return DomainOwner{std::move(vm_id), std::move(tenant_id), gen};
}

}  // namespace nm
