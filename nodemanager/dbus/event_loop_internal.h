// For .cc files of nodemanager/dbus only: the raw sd_event behind an SdEventLoop, so the bus can
// attach to it. Not installed, never included from a public header.
#pragma once

#include <systemd/sd-event.h>

#include "event_loop.h"

namespace nm {

struct SdEventLoopAccess {
  // Borrowed: valid while `loop` lives.
  static sd_event* event(SdEventLoop& loop);
};

}  // namespace nm
