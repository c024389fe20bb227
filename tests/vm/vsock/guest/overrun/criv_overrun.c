// SPDX-License-Identifier: GPL-2.0
/* A hostile guest for the vsock backend's tests: /proc/criv_overrun takes a socket fd of
 * the writing process and makes the guest kernel believe the host granted ~2 GiB of
 * credit on that connection, so the guest sends past the credit the host really gave.
 * Built against the Debian kernel the vsock test VM boots (images/test-vsock/build.py). */
#include <linux/kernel.h>
#include <linux/module.h>
#include <linux/net.h>
#include <linux/proc_fs.h>
#include <linux/string.h>
#include <linux/uaccess.h>
#include <linux/virtio_vsock.h>
#include <net/af_vsock.h>
#include <net/sock.h>

static ssize_t overrun_write(struct file *file, const char __user *ubuf, size_t len,
			     loff_t *off)
{
	char buf[16];
	struct virtio_vsock_sock *vvs;
	struct socket *sock;
	int fd, err;

	if (len == 0 || len >= sizeof(buf))
		return -EINVAL;
	if (copy_from_user(buf, ubuf, len))
		return -EFAULT;
	buf[len] = 0;
	if (kstrtoint(strim(buf), 10, &fd))
		return -EINVAL;
	sock = sockfd_lookup(fd, &err);
	if (!sock)
		return err;
	if (sock->sk->sk_family != AF_VSOCK) {
		sockfd_put(sock);
		return -EINVAL;
	}
	lock_sock(sock->sk);
	vvs = vsock_sk(sock->sk)->trans;
	if (vvs) {
		spin_lock_bh(&vvs->tx_lock);
		vvs->peer_buf_alloc = 0x7fffffff;
		spin_unlock_bh(&vvs->tx_lock);
		/* newer kernels cap the TX credit by the socket's own buffer size as well */
		spin_lock_bh(&vvs->rx_lock);
		vvs->buf_alloc = 0x7fffffff;
		spin_unlock_bh(&vvs->rx_lock);
	}
	release_sock(sock->sk);
	/* a writer blocked for want of credit re-checks only when woken */
	sock->sk->sk_write_space(sock->sk);
	sockfd_put(sock);
	return vvs ? (ssize_t)len : -ENOTCONN;
}

static const struct proc_ops overrun_ops = {
	.proc_write = overrun_write,
};

static int __init overrun_init(void)
{
	return proc_create("criv_overrun", 0200, NULL, &overrun_ops) ? 0 : -ENOMEM;
}

static void __exit overrun_exit(void)
{
	remove_proc_entry("criv_overrun", NULL);
}

module_init(overrun_init);
module_exit(overrun_exit);
MODULE_LICENSE("GPL");
MODULE_DESCRIPTION("criv test: ignore the vsock credit the host gives");
