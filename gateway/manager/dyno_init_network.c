/*
 * dyno-init: the dyno's network, made by the init itself as root before its PID
 * namespace (gateway/manager/veth.py has the rules around it): loopback up in its own
 * network namespace and, with outbound networking, a veth pair: its host end addressed
 * and up in the host's namespace, its other end `eth0` in the dyno's, a default route
 * through the host end. Over rtnetlink, as `ip` would do it, with no process for it.
 */
#include "dyno_init.h"

#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_link.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/veth.h>
#include <net/if.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* rtnetlink requests, each acknowledged: what `ip link add ... type veth`, `ip addr add`,
 * `ip link set up` and `ip route add default` send, without a process for each. */
struct nl_request {
    struct nlmsghdr header;
    char body[1024];
};

static void *nl_tail(struct nl_request *req) {
    return (char *)req + NLMSG_ALIGN(req->header.nlmsg_len);
}

static struct rtattr *nl_attr(struct nl_request *req, int type, const void *data, size_t len) {
    struct rtattr *attr = nl_tail(req);
    attr->rta_type = (unsigned short)type;
    attr->rta_len = (unsigned short)RTA_LENGTH(len);
    if (len)
        memcpy(RTA_DATA(attr), data, len);
    req->header.nlmsg_len = NLMSG_ALIGN(req->header.nlmsg_len) + RTA_ALIGN(attr->rta_len);
    return attr;
}

static void nl_end(struct nl_request *req, struct rtattr *nest) {
    nest->rta_len = (unsigned short)((char *)nl_tail(req) - (char *)nest);
}

static void nl_init(struct nl_request *req, int type, int flags, const void *msg, size_t len) {
    memset(req, 0, sizeof *req);
    req->header.nlmsg_len = (unsigned)NLMSG_LENGTH(len);
    req->header.nlmsg_type = (unsigned short)type;
    req->header.nlmsg_flags = (unsigned short)(NLM_F_REQUEST | NLM_F_ACK | flags);
    memcpy(NLMSG_DATA(&req->header), msg, len);
}

/* Send a request, wait for its acknowledgement; dies with the kernel's error. */
static void nl_talk(int nl, struct nl_request *req, const char *what) {
    static unsigned seq;
    req->header.nlmsg_seq = ++seq;
    if (send(nl, req, req->header.nlmsg_len, 0) < 0)
        die(what);
    char reply[8192];
    for (;;) {
        ssize_t n = recv(nl, reply, sizeof reply, 0);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            die(what);
        for (struct nlmsghdr *h = (struct nlmsghdr *)reply; NLMSG_OK(h, (unsigned)n);
             h = NLMSG_NEXT(h, n)) {
            if (h->nlmsg_seq != seq || h->nlmsg_type != NLMSG_ERROR)
                continue;
            int error = ((struct nlmsgerr *)NLMSG_DATA(h))->error;
            if (error) {
                errno = -error;
                die(what);
            }
            return;
        }
    }
}

int nl_open(void) {
    int nl = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (nl < 0)
        die("netlink");
    return nl;
}

static void link_up(int nl, int index, const char *what) {
    struct ifinfomsg info = {.ifi_family = AF_UNSPEC, .ifi_index = index,
                             .ifi_flags = IFF_UP, .ifi_change = IFF_UP};
    struct nl_request req;
    nl_init(&req, RTM_NEWLINK, 0, &info, sizeof info);
    nl_talk(nl, &req, what);
}

static void add_address(int nl, int index, const char *address, const char *what) {
    struct in_addr addr;
    if (inet_pton(AF_INET, address, &addr) != 1) {
        errno = EINVAL;
        die(what);
    }
    struct ifaddrmsg info = {.ifa_family = AF_INET, .ifa_prefixlen = 30,
                             .ifa_scope = RT_SCOPE_UNIVERSE, .ifa_index = (unsigned)index};
    struct nl_request req;
    nl_init(&req, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, &info, sizeof info);
    nl_attr(&req, IFA_LOCAL, &addr, sizeof addr);
    nl_attr(&req, IFA_ADDRESS, &addr, sizeof addr);
    nl_talk(nl, &req, what);
}

/* The index of the link named `name` in the namespace of `nl`. */
static int link_index(int nl, const char *name) {
    struct ifinfomsg info = {.ifi_family = AF_UNSPEC};
    struct nl_request req;
    nl_init(&req, RTM_GETLINK, 0, &info, sizeof info);
    req.header.nlmsg_flags = NLM_F_REQUEST;
    req.header.nlmsg_seq = 0x7fffffff;
    nl_attr(&req, IFLA_IFNAME, name, strlen(name) + 1);
    if (send(nl, &req, req.header.nlmsg_len, 0) < 0)
        die(name);
    char reply[8192];
    ssize_t n;
    while ((n = recv(nl, reply, sizeof reply, 0)) < 0 && errno == EINTR) {
    }
    if (n < 0)
        die(name);
    struct nlmsghdr *h = (struct nlmsghdr *)reply;
    if (!NLMSG_OK(h, (unsigned)n) || h->nlmsg_type != RTM_NEWLINK) {
        errno = h->nlmsg_type == NLMSG_ERROR ? -((struct nlmsgerr *)NLMSG_DATA(h))->error
                                              : EPROTO;
        die(name);
    }
    return ((struct ifinfomsg *)NLMSG_DATA(h))->ifi_index;
}

static void default_route(int nl, const char *gateway) {
    struct in_addr addr;
    if (inet_pton(AF_INET, gateway, &addr) != 1) {
        errno = EINVAL;
        die("the default route");
    }
    struct rtmsg info = {.rtm_family = AF_INET, .rtm_table = RT_TABLE_MAIN,
                         .rtm_protocol = RTPROT_BOOT, .rtm_scope = RT_SCOPE_UNIVERSE,
                         .rtm_type = RTN_UNICAST};
    struct nl_request req;
    nl_init(&req, RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, &info, sizeof info);
    nl_attr(&req, RTA_GATEWAY, &addr, sizeof addr);
    nl_talk(nl, &req, "the default route");
}

/* Called in the dyno's new network namespace: loopback up; and with `host` (a netlink
 * socket opened in the host's namespace, or -1) a veth pair, its host end addressed and
 * up there, its other end `eth0` here with the /30's other address and a default route
 * through the host end. The pair goes with the namespace. */
void build_network(int host, const char *veth_host, const char *host_addr,
                   const char *dyno_addr) {
    int dyno = nl_open();
    link_up(dyno, link_index(dyno, "lo"), "lo");
    if (host < 0) {
        close(dyno);
        return;
    }
    char what[128];
    snprintf(what, sizeof what, "creating the veth pair %s", veth_host);
    struct ifinfomsg info = {.ifi_family = AF_UNSPEC};
    struct nl_request req;
    nl_init(&req, RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, &info, sizeof info);
    nl_attr(&req, IFLA_IFNAME, veth_host, strlen(veth_host) + 1);
    struct rtattr *linkinfo = nl_attr(&req, IFLA_LINKINFO, NULL, 0);
    nl_attr(&req, IFLA_INFO_KIND, "veth", 4);
    struct rtattr *data = nl_attr(&req, IFLA_INFO_DATA, NULL, 0);
    struct rtattr *peer = nl_attr(&req, VETH_INFO_PEER, &info, sizeof info);
    nl_attr(&req, IFLA_IFNAME, "eth0", 5);
    uint32_t self = (uint32_t)getpid();  /* its namespace: the new one */
    nl_attr(&req, IFLA_NET_NS_PID, &self, sizeof self);
    nl_end(&req, peer);
    nl_end(&req, data);
    nl_end(&req, linkinfo);
    nl_talk(host, &req, what);

    int index = link_index(host, veth_host);
    add_address(host, index, host_addr, what);
    link_up(host, index, what);

    index = link_index(dyno, "eth0");
    add_address(dyno, index, dyno_addr, "eth0");
    link_up(dyno, index, "eth0");
    default_route(dyno, host_addr);
    close(dyno);
}
