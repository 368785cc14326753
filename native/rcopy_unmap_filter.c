/* nbdkit filter "rcopy-unmap": a zero request to a thin secondary unmaps the whole pool blocks it covers.
 *
 * nbdkit's file plugin zeroes a block device by writing zeroes (dm-thin has no WRITE_ZEROES), so every
 * zero run of a full copy used to allocate pool space: a thin secondary ended as large as its volume.
 * For the exports named by unmap=EXPORT:GRANULARITY:PATH (repeat for several), this filter sends the
 * part of a zero request that covers whole blocks of GRANULARITY bytes as BLKDISCARD to PATH, and only
 * the unaligned head and tail on to the plugin. rcopy's agent names an export only where an unmapped
 * block is known to read as zeroes and to be zeroed when provisioned again: a dm-thin volume with no
 * external origin, in a pool that zeroes new blocks (-Zy), whose queue accepts discards
 * (rcopy.backends.unmap_granules). A client's NO_HOLE flag is honoured (nothing is unmapped), and a
 * discard the device refuses falls back to writing the zeroes, so the answer is always the same data.
 * Like the zeroes written, the unmapping is durable once the client's FLUSH is answered (dm-thin commits
 * its metadata on a flush); rcopy flushes every connection before it commits a sync point. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#define MAX_UNMAP 64

struct unmap { char *export; char *path; uint64_t granularity; };

static int nunmap;
static struct unmap unmaps[MAX_UNMAP];

struct handle { int fd; uint64_t granularity; };

static int unmap_config(nbdkit_next_config *next, nbdkit_backend *nxdata, const char *key, const char *value)
{
  const char *c1, *c2;
  char *end;
  unsigned long long g;

  if (strcmp(key, "unmap") != 0)
    return next(nxdata, key, value);
  if (nunmap == MAX_UNMAP) {
    nbdkit_error("rcopy-unmap: more than %d unmap= exports", MAX_UNMAP);
    return -1;
  }
  c1 = strchr(value, ':');
  c2 = c1 ? strchr(c1 + 1, ':') : NULL;
  if (!c1 || !c2 || c1 == value || c2[1] != '/') {
    nbdkit_error("rcopy-unmap: unmap=%s is not EXPORT:GRANULARITY:/PATH", value);
    return -1;
  }
  errno = 0;
  g = strtoull(c1 + 1, &end, 10);
  if (errno || end != c2 || g < 512 || g > (1ULL << 30) || (g & (g - 1)) != 0) {
    nbdkit_error("rcopy-unmap: unmap=%s: the granularity must be a power of two from 512 bytes to 1 GiB", value);
    return -1;
  }
  unmaps[nunmap].export = strndup(value, c1 - value);
  unmaps[nunmap].path = strdup(c2 + 1);
  if (!unmaps[nunmap].export || !unmaps[nunmap].path) {
    nbdkit_error("rcopy-unmap: out of memory");
    return -1;
  }
  unmaps[nunmap++].granularity = g;
  return 0;
}

static void unmap_unload(void)
{
  for (int i = 0; i < nunmap; i++) {
    free(unmaps[i].export);
    free(unmaps[i].path);
  }
}

static void *unmap_open(nbdkit_next_open *next, nbdkit_context *nxdata, int readonly, const char *exportname,
                        int is_tls)
{
  struct handle *h;

  (void) is_tls;
  if (next(nxdata, readonly, exportname) == -1)
    return NULL;
  h = malloc(sizeof *h);
  if (!h) {
    nbdkit_error("rcopy-unmap: out of memory");
    return NULL;
  }
  h->fd = -1;
  h->granularity = 0;
  for (int i = 0; !readonly && i < nunmap; i++)
    if (strcmp(unmaps[i].export, exportname) == 0) {
      h->fd = open(unmaps[i].path, O_WRONLY | O_CLOEXEC);
      if (h->fd == -1)
        nbdkit_debug("rcopy-unmap: %s: %m: zeroes are written", unmaps[i].path);
      h->granularity = unmaps[i].granularity;
      break;
    }
  return h;
}

static void unmap_close(void *handle)
{
  struct handle *h = handle;

  if (h->fd != -1)
    close(h->fd);
  free(h);
}

static int unmap_zero(nbdkit_next *next, void *handle, uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  struct handle *h = handle;
  uint64_t end = offset + count, first, last, range[2];

  /* a discard is made durable by the next flush, not by FUA: such a request writes its zeroes */
  if (h->fd == -1 || !(flags & NBDKIT_FLAG_MAY_TRIM) || (flags & NBDKIT_FLAG_FUA))
    return next->zero(next, count, offset, flags, err);
  first = (offset + h->granularity - 1) & ~(h->granularity - 1);
  last = end & ~(h->granularity - 1);
  if (last <= first)
    return next->zero(next, count, offset, flags, err);
  range[0] = first;
  range[1] = last - first;
  if (ioctl(h->fd, BLKDISCARD, range) == -1) {
    nbdkit_debug("rcopy-unmap: BLKDISCARD %" PRIu64 "+%" PRIu64 ": %m: zeroes are written", range[0], range[1]);
    return next->zero(next, count, offset, flags, err);
  }
  if (first > offset && next->zero(next, first - offset, offset, flags, err) == -1)
    return -1;
  if (end > last && next->zero(next, end - last, last, flags, err) == -1)
    return -1;
  return 0;
}

static struct nbdkit_filter filter = {
  .name = "rcopy-unmap",
  .longname = "rcopy: zero runs unmap whole thin pool blocks",
  .config = unmap_config,
  .config_help = "unmap=EXPORT:GRANULARITY:/PATH  unmap whole blocks of that export's device; repeat for several",
  .unload = unmap_unload,
  .open = unmap_open,
  .close = unmap_close,
  .zero = unmap_zero,
};

NBDKIT_REGISTER_FILTER(filter)
