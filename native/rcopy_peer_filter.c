/* nbdkit filter "rcopy-peer": admit connections from the given addresses only (allow=ADDR, repeated for
 * each of the primary's links, up to MAX_ALLOWED), refuse every other one before the NBD handshake, and
 * refuse to start without allow= (fail closed). rcopy's agent loads it on the export so only the
 * primary's link addresses get as far as TLS (rcopy/transport/export.py).
 * What nbdkit's own ip filter would do, but nbdkit 1.32.5's rejects every address rule. */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <string.h>
#include <sys/socket.h>

#include <nbdkit-filter.h>

#define MAX_ALLOWED 16

static int nallowed;
static int family[MAX_ALLOWED];                 /* AF_INET or AF_INET6 */
static unsigned char allowed[MAX_ALLOWED][16];  /* the addresses, network order */

static int peer_config(nbdkit_next_config *next, nbdkit_backend *nxdata, const char *key, const char *value)
{
  if (strcmp(key, "allow") != 0)
    return next(nxdata, key, value);
  if (nallowed == MAX_ALLOWED) {
    nbdkit_error("rcopy-peer: more than %d allow= addresses", MAX_ALLOWED);
    return -1;
  }
  if (inet_pton(AF_INET, value, allowed[nallowed]) == 1)
    family[nallowed++] = AF_INET;
  else if (inet_pton(AF_INET6, value, allowed[nallowed]) == 1)
    family[nallowed++] = AF_INET6;
  else {
    nbdkit_error("rcopy-peer: allow=%s is not an IPv4 or IPv6 address", value);
    return -1;
  }
  return 0;
}

static int peer_config_complete(nbdkit_next_config_complete *next, nbdkit_backend *nxdata)
{
  if (!nallowed) {
    nbdkit_error("rcopy-peer: allow=ADDR is required");
    return -1;
  }
  return next(nxdata);
}

static int peer_preconnect(nbdkit_next_preconnect *next, nbdkit_backend *nxdata, int readonly)
{
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  const unsigned char *a = NULL;
  int fam = 0;
  char text[INET6_ADDRSTRLEN] = "?";

  memset(&ss, 0, sizeof ss);
  if (nbdkit_peer_name((struct sockaddr *) &ss, &len) == -1)
    return -1;                        /* not a TCP peer (or unknown): refused, nbdkit said why */
  if (ss.ss_family == AF_INET) {
    fam = AF_INET;
    a = (const unsigned char *) &((struct sockaddr_in *) &ss)->sin_addr;
  } else if (ss.ss_family == AF_INET6) {
    const struct in6_addr *a6 = &((struct sockaddr_in6 *) &ss)->sin6_addr;
    fam = AF_INET6;
    a = a6->s6_addr;
    if (IN6_IS_ADDR_V4MAPPED(a6)) {   /* an IPv4 client of a dual-stack socket */
      fam = AF_INET;
      a += 12;
    }
  }
  for (int i = 0; a && i < nallowed; i++)
    if (fam == family[i] && memcmp(a, allowed[i], fam == AF_INET ? 4 : 16) == 0)
      return next(nxdata, readonly);
  if (a)
    inet_ntop(fam, a, text, sizeof text);
  nbdkit_error("rcopy-peer: connection from %s refused (only the primary's link addresses may connect)", text);
  return -1;
}

static struct nbdkit_filter filter = {
  .name = "rcopy-peer",
  .longname = "rcopy peer address fence",
  .config = peer_config,
  .config_complete = peer_config_complete,
  .config_help = "allow=ADDR  an address (IPv4 or IPv6) admitted; repeat for several",
  .preconnect = peer_preconnect,
};

NBDKIT_REGISTER_FILTER(filter)
