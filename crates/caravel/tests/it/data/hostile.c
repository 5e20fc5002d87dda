/* A hostile tenant's task, for the isolation tests: each argument names one attempt, and
 * the program prints one line per attempt, `NAME ALLOWED ...` or `NAME REFUSED <errno>`.
 * Built static by the test (`cc -static`), so the same binary runs in the node's own
 * sandbox and inside an OCI image with no C library.
 *
 *   read:PATH      open and read a file
 *   list:PATH      list a folder
 *   write:PATH     create a file
 *   environ:WORD   look for WORD in every /proc/PID/environ this task can read
 *   signal:PID     kill(PID, 0), then SIGKILL
 *   ptrace:PID     PTRACE_ATTACH
 *   mount          mount a tmpfs on /tmp
 *   unshare        make a user namespace
 *   setuid         setuid(0)
 *   raw            a raw ICMP socket
 *   module         finit_module
 *   euid           print the effective uid (ALLOWED when it is 0)
 *   dev:PATH       open a device file
 *   forkbomb:N     fork up to N sleeping children; ALLOWED when all N were made
 *   fill:MIB       write MIB files of 1 MiB into the working directory, then sleep
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <netinet/in.h>
#include <unistd.h>

static void refused(const char *name, int e) { printf("%s REFUSED %s\n", name, strerror(e)); }
static void allowed(const char *name, const char *what) { printf("%s ALLOWED %s\n", name, what); }

static void do_read(const char *name, const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) { refused(name, errno); return; }
    char buf[256];
    ssize_t n = read(fd, buf, sizeof buf - 1);
    int e = errno;
    close(fd);
    if (n < 0) { refused(name, e); return; }
    buf[n] = 0;
    for (ssize_t i = 0; i < n; i++) if (buf[i] == '\n') buf[i] = ' ';
    allowed(name, buf);
}

static void do_list(const char *name, const char *path) {
    DIR *d = opendir(path);
    if (!d) { refused(name, errno); return; }
    char out[512] = "";
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        if (strlen(out) + strlen(e->d_name) + 2 < sizeof out) { strcat(out, e->d_name); strcat(out, ","); }
    }
    closedir(d);
    allowed(name, out);
}

static void do_write(const char *name, const char *path) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { refused(name, errno); return; }
    int ok = write(fd, "pwned\n", 6) == 6;
    int e = errno;
    close(fd);
    if (!ok) { refused(name, e); return; }
    allowed(name, path);
}

static void do_environ(const char *name, const char *word) {
    DIR *d = opendir("/proc");
    if (!d) { refused(name, errno); return; }
    struct dirent *e;
    int found = 0, readable = 0;
    while ((e = readdir(d))) {
        if (e->d_name[0] < '0' || e->d_name[0] > '9') continue;
        char p[64];
        snprintf(p, sizeof p, "/proc/%s/environ", e->d_name);
        int fd = open(p, O_RDONLY);
        if (fd < 0) continue;
        readable++;
        char buf[65536];
        ssize_t n = read(fd, buf, sizeof buf);
        close(fd);
        if (n > 0 && memmem(buf, n, word, strlen(word))) found = 1;
    }
    closedir(d);
    if (found) allowed(name, word);
    else { printf("%s REFUSED not found (%d readable)\n", name, readable); }
}

static void do_signal(const char *name, pid_t pid) {
    if (kill(pid, 0) != 0) { refused(name, errno); return; }
    if (kill(pid, SIGKILL) != 0) { refused(name, errno); return; }
    allowed(name, "killed");
}

static void do_ptrace(const char *name, pid_t pid) {
    if (ptrace(PTRACE_ATTACH, pid, 0, 0) != 0) { refused(name, errno); return; }
    allowed(name, "attached");
}

static void do_forkbomb(const char *name, int n) {
    int made = 0, e = 0;
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p < 0) { e = errno; break; }
        if (p == 0) { pause(); _exit(0); }
        made++;
    }
    if (made == n) allowed(name, "all forked");
    else printf("%s REFUSED after %d forks: %s\n", name, made, strerror(e));
    fflush(stdout);
    kill(0, SIGKILL);
}

static void do_fill(const char *name, int mib) {
    static char buf[1 << 20];
    memset(buf, 'x', sizeof buf);
    for (int i = 0; i < mib; i++) {
        char p[64];
        snprintf(p, sizeof p, "fill-%d", i);
        int fd = open(p, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0 || write(fd, buf, sizeof buf) != (ssize_t)sizeof buf) {
            int e = errno;
            printf("%s REFUSED after %d MiB: %s\n", name, i, strerror(e));
            fflush(stdout);
            if (fd >= 0) close(fd);
            pause();
            return;
        }
        close(fd);
    }
    printf("%s ALLOWED wrote %d MiB\n", name, mib);
    fflush(stdout);
    /* Still: the agent's next look at the disk must stop this task. */
    pause();
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    for (int i = 1; i < argc; i++) {
        char *a = argv[i];
        char *arg = strchr(a, ':');
        char name[256];
        snprintf(name, sizeof name, "%s", a);
        if (arg) { *arg++ = 0; }
        if (!strcmp(a, "read")) do_read(name, arg);
        else if (!strcmp(a, "list")) do_list(name, arg);
        else if (!strcmp(a, "write")) do_write(name, arg);
        else if (!strcmp(a, "environ")) do_environ(name, arg);
        else if (!strcmp(a, "signal")) do_signal(name, atoi(arg));
        else if (!strcmp(a, "ptrace")) do_ptrace(name, atoi(arg));
        else if (!strcmp(a, "mount")) {
            if (mount("none", "/tmp", "tmpfs", 0, "") != 0) refused(name, errno); else allowed(name, "mounted");
        } else if (!strcmp(a, "unshare")) {
            if (unshare(CLONE_NEWUSER) != 0) refused(name, errno); else allowed(name, "new user namespace");
        } else if (!strcmp(a, "setuid")) {
            if (setuid(0) != 0) refused(name, errno); else allowed(name, "root");
        } else if (!strcmp(a, "raw")) {
            int s = socket(AF_INET, SOCK_RAW, IPPROTO_ICMP);
            if (s < 0) refused(name, errno); else allowed(name, "raw socket");
        } else if (!strcmp(a, "module")) {
            int fd = open("/proc/self/exe", O_RDONLY);
            if (syscall(SYS_finit_module, fd, "", 0) != 0) refused(name, errno); else allowed(name, "loaded");
        } else if (!strcmp(a, "euid")) {
            char b[32];
            snprintf(b, sizeof b, "%d", (int)geteuid());
            if (geteuid() == 0) allowed(name, b); else printf("%s REFUSED euid %s\n", name, b);
        } else if (!strcmp(a, "dev")) {
            int fd = open(arg, O_RDWR);
            if (fd < 0) refused(name, errno); else allowed(name, "opened");
        } else if (!strcmp(a, "forkbomb")) do_forkbomb(name, atoi(arg));
        else if (!strcmp(a, "fill")) do_fill(name, atoi(arg));
        else printf("%s UNKNOWN\n", name);
    }
    return 0;
}
