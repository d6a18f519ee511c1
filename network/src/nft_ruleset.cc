#include "nm/network/nft_ruleset.h"

#include <algorithm>
#include <cassert>

namespace nm::network {
namespace {

constexpr std::string_view kComment = " comment \"nodemanager\"";

std::string table_ref() {
  return std::string(kNftFamily) + " " + std::string(kNftTable);
}

std::string quoted(std::string_view ifname) {
  assert(is_valid_port_ifname(ifname));
  return "\"" + std::string(ifname) + "\"";
}

std::string port_element(const PortRule& p) {
  return quoted(p.ifname);
}
std::string mac_element(const PortRule& p) {
  return quoted(p.ifname) + " . " + p.mac.str();
}
std::string ip_element(const PortRule& p) {
  return quoted(p.ifname) + " . " + p.ip.str();
}

using ElementFn = std::string (*)(const PortRule&);

struct SetDef {
  std::string_view name;
  std::string_view type;
  ElementFn element;
};

constexpr SetDef kSets[] = {
    {kNftPortSet, "ifname", port_element},
    {kNftMacSet, "ifname . ether_addr", mac_element},
    {kNftIpSet, "ifname . ipv4_addr", ip_element},
};

void render_set(std::string& out, const SetDef& set, const std::vector<PortRule>& ports) {
  out += "\tset " + std::string(set.name) + " {\n";
  out += "\t\ttype " + std::string(set.type) + "\n";
  out += "\t\tcomment \"nodemanager\"\n";
  if (!ports.empty()) {
    out += "\t\telements = {\n";
    for (size_t i = 0; i < ports.size(); ++i) {
      out += "\t\t\t" + set.element(ports[i]) + (i + 1 < ports.size() ? ",\n" : "\n");
    }
    out += "\t\t}\n";
  }
  out += "\t}\n";
}

void render_chain(std::string& out, std::string_view name, std::string_view hook,
                  std::initializer_list<std::string_view> rules) {
  out += "\tchain " + std::string(name) + " {\n";
  if (!hook.empty()) out += "\t\t" + std::string(hook) + "\n";
  out += "\t\tcomment \"nodemanager\"\n";
  for (std::string_view rule : rules) {
    out += "\t\t" + std::string(rule) + std::string(kComment) + "\n";
  }
  out += "\t}\n";
}

// Adds the port's element to each set, then runs `verb` ("add" or "delete") on them.
std::string render_elements(const PortRule& port, std::initializer_list<std::string_view> verbs) {
  std::string out;
  for (std::string_view verb : verbs) {
    for (const SetDef& set : kSets) {
      out += std::string(verb) + " element " + table_ref() + " " + std::string(set.name) + " { " +
             set.element(port) + " }\n";
    }
  }
  return out;
}

}  // namespace

bool is_valid_port_ifname(std::string_view ifname) {
  if (ifname.empty() || ifname.size() > kMaxIfnameLength || ifname == "." || ifname == "..") {
    return false;
  }
  return std::all_of(ifname.begin(), ifname.end(), [](char c) {
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.';
  });
}

std::string render_ruleset(std::vector<PortRule> ports) {
  std::sort(ports.begin(), ports.end());
  ports.erase(std::unique(ports.begin(), ports.end()), ports.end());

  const std::string table = table_ref();
  std::string out;
  out += "table " + table + " {}\n";
  out += "delete table " + table + "\n";
  out += "table " + table + " {\n";
  out += "\tcomment \"nodemanager\"\n";
  for (const SetDef& set : kSets) render_set(out, set, ports);

  const std::string ports_ref = "@" + std::string(kNftPortSet);
  const std::string macs_ref = "@" + std::string(kNftMacSet);
  const std::string ips_ref = "@" + std::string(kNftIpSet);
  const std::string to_port = "iifname " + ports_ref + " goto port_in";
  const std::string mac_check = "iifname . ether saddr != " + macs_ref + " drop";
  const std::string ip_accept = "iifname . ip saddr " + ips_ref + " accept";
  const std::string arp_mac_check = "iifname . arp saddr ether != " + macs_ref + " drop";
  const std::string arp_ip_accept = "iifname . arp saddr ip " + ips_ref + " accept";

  render_chain(out, "prerouting", "type filter hook prerouting priority filter; policy accept;",
               {to_port, "iifname \"nmt*\" drop"});
  render_chain(out, "port_in", "",
               {mac_check, "ether type vmap { ip : goto port_ipv4, arp : goto port_arp }", "drop"});
  render_chain(
      out, "port_ipv4", "",
      {"udp sport 67 drop", ip_accept,
       "ip saddr 0.0.0.0 ip daddr 255.255.255.255 udp sport 68 udp dport 67 accept", "drop"});
  render_chain(
      out, "port_arp", "",
      {"arp htype != 1 drop", "arp ptype != ip drop", "arp hlen != 6 drop", "arp plen != 4 drop",
       arp_mac_check, arp_ip_accept, "arp operation request arp saddr ip 0.0.0.0 accept", "drop"});
  // DHCP stays on its host: every host of a network runs its own server with the same address
  // and only knows the leases of its own ports, so a server must neither hear clients nor be
  // heard across the VXLAN device (a remote server would refuse a lease it does not know).
  render_chain(
      out, "forward", "type filter hook forward priority filter; policy accept;",
      {R"(iifname "nmdh*" oifname "nmvx*" drop)", R"(iifname "nmvx*" oifname "nmdh*" drop)"});
  out += "}\n";
  return out;
}

std::string render_add_port(const PortRule& port) {
  return render_elements(port, {"add"});
}

std::string render_remove_port(const PortRule& port) {
  return render_elements(port, {"add", "delete"});
}

}  // namespace nm::network
