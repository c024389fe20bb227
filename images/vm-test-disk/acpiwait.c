/* acpiwait: exit 0 when the ACPI power button is pressed (exit 1 on any error).
 *
 * criv's guest kernel has ACPI and the button driver but no evdev, so busybox acpid cannot
 * see the button; the kernel also sends each button event on the generic netlink family
 * "acpi_event" (group "acpi_mc_group"), which this listens to. Built static by
 * images/vm-test-disk/build.py; the test disk's init powers off when it exits 0. */
#include <linux/genetlink.h>
#include <linux/netlink.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define BUF 8192

struct acpi_genl_event {
    char device_class[20];
    char bus_id[15];
    uint32_t type;
    uint32_t data;
};

static struct nlattr *attr_find(void *start, int len, int type) {
    struct nlattr *a = start;
    while (len >= (int)sizeof *a && a->nla_len >= sizeof *a && a->nla_len <= len) {
        if ((a->nla_type & NLA_TYPE_MASK) == type) return a;
        int step = NLA_ALIGN(a->nla_len);
        len -= step;
        a = (struct nlattr *)((char *)a + step);
    }
    return NULL;
}

int main(void) {
    int fd = socket(AF_NETLINK, SOCK_RAW, NETLINK_GENERIC);
    if (fd < 0) return 1;
    struct {
        struct nlmsghdr n;
        struct genlmsghdr g;
        char buf[64];
    } req;
    memset(&req, 0, sizeof req);
    const char *fam = "acpi_event";
    struct nlattr *na = (struct nlattr *)req.buf;
    na->nla_type = CTRL_ATTR_FAMILY_NAME;
    na->nla_len = NLA_HDRLEN + strlen(fam) + 1;
    memcpy((char *)na + NLA_HDRLEN, fam, strlen(fam) + 1);
    req.n.nlmsg_len = NLMSG_LENGTH(GENL_HDRLEN) + NLA_ALIGN(na->nla_len);
    req.n.nlmsg_type = GENL_ID_CTRL;
    req.n.nlmsg_flags = NLM_F_REQUEST;
    req.g.cmd = CTRL_CMD_GETFAMILY;
    req.g.version = 1;
    struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
    if (sendto(fd, &req, req.n.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof kernel) < 0)
        return 1;
    static char buf[BUF];
    int n = recv(fd, buf, sizeof buf, 0);
    struct nlmsghdr *h = (struct nlmsghdr *)buf;
    if (n < (int)NLMSG_LENGTH(GENL_HDRLEN) || !NLMSG_OK(h, n) || h->nlmsg_type == NLMSG_ERROR)
        return 1;
    char *attrs = (char *)NLMSG_DATA(h) + GENL_HDRLEN;
    int alen = h->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN);
    struct nlattr *id = attr_find(attrs, alen, CTRL_ATTR_FAMILY_ID);
    struct nlattr *groups = attr_find(attrs, alen, CTRL_ATTR_MCAST_GROUPS);
    if (!id || !groups) return 1;
    uint16_t family = *(uint16_t *)((char *)id + NLA_HDRLEN);
    uint32_t group = 0;
    char *g = (char *)groups + NLA_HDRLEN;
    int glen = groups->nla_len - NLA_HDRLEN;
    while (glen >= NLA_HDRLEN && !group) {
        struct nlattr *one = (struct nlattr *)g;
        if (one->nla_len < NLA_HDRLEN || one->nla_len > glen) break;
        struct nlattr *gid = attr_find(g + NLA_HDRLEN, one->nla_len - NLA_HDRLEN, CTRL_ATTR_MCAST_GRP_ID);
        if (gid) group = *(uint32_t *)((char *)gid + NLA_HDRLEN);
        glen -= NLA_ALIGN(one->nla_len);
        g += NLA_ALIGN(one->nla_len);
    }
    if (!group || setsockopt(fd, SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, &group, sizeof group) < 0)
        return 1;
    for (;;) {
        n = recv(fd, buf, sizeof buf, 0);
        if (n < 0) return 1;
        for (h = (struct nlmsghdr *)buf; NLMSG_OK(h, n); h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_type != family || h->nlmsg_len < NLMSG_LENGTH(GENL_HDRLEN)) continue;
            attrs = (char *)NLMSG_DATA(h) + GENL_HDRLEN;
            alen = h->nlmsg_len - NLMSG_LENGTH(GENL_HDRLEN);
            struct nlattr *ev = attr_find(attrs, alen, 1 /* ACPI_GENL_ATTR_EVENT */);
            if (!ev || ev->nla_len < NLA_HDRLEN + sizeof(struct acpi_genl_event)) continue;
            struct acpi_genl_event *e = (struct acpi_genl_event *)((char *)ev + NLA_HDRLEN);
            if (strncmp(e->device_class, "button/power", 12) == 0) return 0;
        }
    }
}
