/* Map handles.
 *
 * The maps are created and pinned by the agent (agent/structs.py holds their specs),
 * under the node's bpffs directory, before any program is compiled; the loader
 * passes each map's fd as -DSHOAL_MAP_FD_<name>=<fd>. Programs reach the maps with
 * plain helper calls on SHOAL_MAP(name), so shared helpers in these headers work
 * (bcc only rewrites `table.method()` calls written in the main file), and every
 * attach point, and every restart of the agent, sees the same pinned maps.
 */
#pragma once
#include "shoal.h"

#define SHOAL_MAP(name) ((void *)bpf_pseudo_fd(1, SHOAL_MAP_FD_##name))

#ifndef SHOAL_MAP_FD_enrolled_pods
#error "the loader passes the map fds (SHOAL_MAP_FD_<name>)"
#endif
