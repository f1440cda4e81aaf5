/*
 * The measurement behind src/LibVmm/Userfaultfd.cs: struct sizes and offsets, ioctl numbers, and
 * which userfaultfd operations work on a shmem (memfd) VMA on this kernel. Not built by the tests.
 *   gcc -O1 -pthread -o uffd_probe uffd_probe.c && ./uffd_probe
 * Results on the dev machine (kernel 6.18): see the comment on the Userfaultfd class; the tests in
 * UserfaultfdTests.cs re-check the behaviours the vmspace relies on.
 */
#define _GNU_SOURCE
#include <linux/userfaultfd.h>
#include <sys/syscall.h>
#include <sys/mman.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <stddef.h>
#include <linux/falloc.h>
#ifndef UFFDIO_CONTINUE_MODE_WP
#define UFFDIO_CONTINUE_MODE_WP (1ULL<<1)
#endif
#define PG 4096
static int uffd; static char *gv, *hv; static int mfd;
static volatile int op_page=-1, op_write=0, op_done=0;
static void *toucher(void *a){ for(;;){ while(op_page<0) usleep(100); int p=op_page; if(p==999) return 0;
  if(op_write) gv[p*PG]=0x5a; else { volatile char c=gv[p*PG]; (void)c; } op_page=-1; op_done=1; } }
static int touch(int p,int w){ op_done=0; op_write=w; __sync_synchronize(); op_page=p; 
  struct pollfd pf={uffd,POLLIN,0}; 
  for(int i=0;i<50;i++){ if(op_done) return 0; int r=poll(&pf,1,20); if(r>0) return 1; } return op_done?0:-1; }
static struct uffd_msg msg;
static void rd(const char*what){ int n=read(uffd,&msg,sizeof msg); printf("  [%s] read=%d event=%x flags=%llx addr_off=%lld ptid=%u\n",what,n,msg.event,(unsigned long long)msg.arg.pagefault.flags,(long long)(msg.arg.pagefault.address-(unsigned long)gv),msg.arg.pagefault.feat.ptid);}
static void waitdone(const char*w){ for(int i=0;i<200 && !op_done;i++) usleep(1000); printf("  %s: toucher %s\n",w,op_done?"done":"STILL BLOCKED"); }
static long allocated(){ struct stat st; fstat(mfd,&st); return st.st_blocks*512; }
int main(){
  printf("sizeof uffd_msg=%zu api=%zu range=%zu register=%zu copy=%zu zeropage=%zu wp=%zu continue=%zu\n",sizeof(struct uffd_msg),sizeof(struct uffdio_api),sizeof(struct uffdio_range),sizeof(struct uffdio_register),sizeof(struct uffdio_copy),sizeof(struct uffdio_zeropage),sizeof(struct uffdio_writeprotect),sizeof(struct uffdio_continue));
  printf("offsets msg: flags=%zu address=%zu ptid=%zu\n",offsetof(struct uffd_msg,arg.pagefault.flags),offsetof(struct uffd_msg,arg.pagefault.address),offsetof(struct uffd_msg,arg.pagefault.feat.ptid));
  printf("UFFDIO_API=%#lx REGISTER=%#lx UNREGISTER=%#lx WAKE=%#lx COPY=%#lx ZEROPAGE=%#lx WRITEPROTECT=%#lx CONTINUE=%#lx USERFAULTFD_IOC_NEW=%#lx\n",(unsigned long)UFFDIO_API,(unsigned long)UFFDIO_REGISTER,(unsigned long)UFFDIO_UNREGISTER,(unsigned long)UFFDIO_WAKE,(unsigned long)UFFDIO_COPY,(unsigned long)UFFDIO_ZEROPAGE,(unsigned long)UFFDIO_WRITEPROTECT,(unsigned long)UFFDIO_CONTINUE,(unsigned long)USERFAULTFD_IOC_NEW);
  printf("O_CLOEXEC=%#x O_NONBLOCK=%#x SYS_userfaultfd=%d FALLOC_FL_PUNCH_HOLE=%#x KEEP_SIZE=%#x MADV_DONTNEED=%d MADV_REMOVE=%d POLLIN=%#x SEEK_DATA=%d SEEK_HOLE=%d SYS_eventfd2=%d EFD_CLOEXEC=%#x EFD_NONBLOCK=%#x sizeof pollfd=%zu\n",O_CLOEXEC,O_NONBLOCK,SYS_userfaultfd,FALLOC_FL_PUNCH_HOLE,FALLOC_FL_KEEP_SIZE,MADV_DONTNEED,MADV_REMOVE,POLLIN,SEEK_DATA,SEEK_HOLE,SYS_eventfd2,O_CLOEXEC,O_NONBLOCK,sizeof(struct pollfd));
  uffd=syscall(SYS_userfaultfd,O_CLOEXEC|O_NONBLOCK); printf("syscall uffd=%d errno=%d\n",uffd,errno);
  struct uffdio_api api={.api=UFFD_API,.features=0}; int r=ioctl(uffd,UFFDIO_API,&api); printf("API(0) r=%d features=%#llx ioctls=%#llx\n",r,(unsigned long long)api.features,(unsigned long long)api.ioctls);
  close(uffd);
  int dev=open("/dev/userfaultfd",O_RDWR|O_CLOEXEC); int u2=ioctl(dev,USERFAULTFD_IOC_NEW,O_CLOEXEC|O_NONBLOCK); printf("/dev/userfaultfd new=%d\n",u2); close(u2); close(dev);
  uffd=syscall(SYS_userfaultfd,O_CLOEXEC|O_NONBLOCK);
  api.api=UFFD_API; api.features=UFFD_FEATURE_PAGEFAULT_FLAG_WP|UFFD_FEATURE_MISSING_SHMEM|UFFD_FEATURE_MINOR_SHMEM|UFFD_FEATURE_WP_HUGETLBFS_SHMEM|UFFD_FEATURE_THREAD_ID;
  r=ioctl(uffd,UFFDIO_API,&api); printf("API(wanted) r=%d errno=%d features=%#llx\n",r,errno,(unsigned long long)api.features);
  struct uffdio_api api2={.api=UFFD_API}; r=ioctl(uffd,UFFDIO_API,&api2); printf("second API call r=%d errno=%d\n",r,errno);
  mfd=memfd_create("probe",MFD_CLOEXEC); ftruncate(mfd,32*PG);
  gv=mmap(0,32*PG,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_NORESERVE,mfd,0); hv=mmap(0,32*PG,PROT_READ|PROT_WRITE,MAP_SHARED|MAP_NORESERVE,mfd,0);
  struct uffdio_register reg={.range={(unsigned long)gv,32*PG},.mode=UFFDIO_REGISTER_MODE_MISSING|UFFDIO_REGISTER_MODE_WP|UFFDIO_REGISTER_MODE_MINOR};
  r=ioctl(uffd,UFFDIO_REGISTER,&reg); printf("REGISTER M|WP|MINOR r=%d errno=%d ioctls=%#llx\n",r,errno,(unsigned long long)reg.ioctls);
  pthread_t t; pthread_create(&t,0,toucher,0);
  static char zero[PG] __attribute__((aligned(4096))); static char buf[PG] __attribute__((aligned(4096))); memset(buf,0xab,PG);
  // 1 read missing -> zeropage
  printf("T1 read fresh page 0: fault=%d\n",touch(0,0)); rd("p0 read");
  struct uffdio_zeropage zp={.range={(unsigned long)gv,PG}}; r=ioctl(uffd,UFFDIO_ZEROPAGE,&zp); printf("  ZEROPAGE r=%d errno=%d zeropage=%lld alloc=%ld\n",r,errno,(long long)zp.zeropage,allocated()); waitdone("T1");
  printf("T1b write page 0 after zeropage: fault=%d\n",touch(0,1)); if(op_done==0){rd("p0 write"); } waitdone("T1b");
  // 2 write missing -> copy
  printf("T2 write fresh page 1: fault=%d\n",touch(1,1)); rd("p1 write");
  struct uffdio_copy cp={.dst=(unsigned long)gv+PG,.src=(unsigned long)zero,.len=PG,.mode=0}; r=ioctl(uffd,UFFDIO_COPY,&cp); printf("  COPY r=%d copy=%lld\n",r,(long long)cp.copy); waitdone("T2"); printf("  hv[p1]=%#x\n",(unsigned char)hv[PG]);
  // 3 read missing -> copy WP; then write -> WP fault
  printf("T3 read fresh page 2: fault=%d\n",touch(2,0)); rd("p2 read");
  cp=(struct uffdio_copy){.dst=(unsigned long)gv+2*PG,.src=(unsigned long)buf,.len=PG,.mode=UFFDIO_COPY_MODE_WP}; r=ioctl(uffd,UFFDIO_COPY,&cp); printf("  COPY WP r=%d errno=%d copy=%lld\n",r,errno,(long long)cp.copy); waitdone("T3");
  printf("T3b write page 2: fault=%d\n",touch(2,1)); rd("p2 write");
  struct uffdio_writeprotect wp={.range={(unsigned long)gv+2*PG,PG},.mode=0}; r=ioctl(uffd,UFFDIO_WRITEPROTECT,&wp); printf("  WP off r=%d errno=%d\n",r,errno); waitdone("T3b");
  // 4 MADV_DONTNEED page 2 -> MINOR; continue with WP mode
  r=madvise(gv+2*PG,PG,MADV_DONTNEED); printf("T4 DONTNEED r=%d alloc=%ld\n",r,allocated());
  printf("T4 read page 2: fault=%d\n",touch(2,0)); rd("p2 read after dontneed");
  struct uffdio_continue cn={.range={(unsigned long)gv+2*PG,PG},.mode=UFFDIO_CONTINUE_MODE_WP}; r=ioctl(uffd,UFFDIO_CONTINUE,&cn); printf("  CONTINUE|WP r=%d errno=%d mapped=%lld\n",r,errno,(long long)cn.mapped); waitdone("T4");
  printf("T4b write page 2: fault=%d\n",touch(2,1)); if(!op_done){ rd("p2 write after continue-wp"); wp=(struct uffdio_writeprotect){.range={(unsigned long)gv+2*PG,PG},.mode=0}; ioctl(uffd,UFFDIO_WRITEPROTECT,&wp);} waitdone("T4b");
  // 5 WP on a present page, then DONTNEED, then read: which kind? then continue without WP and write: does WP persist?
  wp=(struct uffdio_writeprotect){.range={(unsigned long)gv+2*PG,PG},.mode=UFFDIO_WRITEPROTECT_MODE_WP}; r=ioctl(uffd,UFFDIO_WRITEPROTECT,&wp); printf("T5 WP on r=%d\n",r);
  madvise(gv+2*PG,PG,MADV_DONTNEED);
  printf("T5 read page 2 (wp'd, zapped): fault=%d\n",touch(2,0)); rd("kind");
  cn=(struct uffdio_continue){.range={(unsigned long)gv+2*PG,PG},.mode=0}; r=ioctl(uffd,UFFDIO_CONTINUE,&cn); printf("  CONTINUE r=%d errno=%d\n",r,errno); waitdone("T5");
  printf("T5b write page 2: fault=%d (1 means WP marker survived)\n",touch(2,1)); if(!op_done){ rd("p2"); wp=(struct uffdio_writeprotect){.range={(unsigned long)gv+2*PG,PG},.mode=0}; ioctl(uffd,UFFDIO_WRITEPROTECT,&wp);} waitdone("T5b");
  // 5c: WP'd + zapped, write -> which kind
  wp=(struct uffdio_writeprotect){.range={(unsigned long)gv+2*PG,PG},.mode=UFFDIO_WRITEPROTECT_MODE_WP}; ioctl(uffd,UFFDIO_WRITEPROTECT,&wp); madvise(gv+2*PG,PG,MADV_DONTNEED);
  printf("T5c write page 2 (wp'd, zapped): fault=%d\n",touch(2,1)); rd("kind");
  cn=(struct uffdio_continue){.range={(unsigned long)gv+2*PG,PG},.mode=0}; r=ioctl(uffd,UFFDIO_CONTINUE,&cn); printf("  CONTINUE r=%d errno=%d\n",r,errno);
  usleep(20000); if(!op_done){ int pr; struct pollfd pf={uffd,POLLIN,0}; pr=poll(&pf,1,100); printf("  still blocked, poll=%d\n",pr); if(pr>0){ rd("refault"); wp=(struct uffdio_writeprotect){.range={(unsigned long)gv+2*PG,PG},.mode=0}; r=ioctl(uffd,UFFDIO_WRITEPROTECT,&wp); printf("  WP off r=%d\n",r);} } waitdone("T5c");
  // 6 punch hole -> MISSING
  long before=allocated(); r=fallocate(mfd,FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE,2*PG,PG); printf("T6 punch r=%d alloc %ld -> %ld\n",r,before,allocated());
  printf("T6 read page 2: fault=%d\n",touch(2,0)); rd("after punch");
  cp=(struct uffdio_copy){.dst=(unsigned long)gv+2*PG,.src=(unsigned long)buf,.len=PG,.mode=0}; r=ioctl(uffd,UFFDIO_COPY,&cp); printf("  COPY r=%d\n",r); waitdone("T6");
  // 7 page present in cache (host view write), guest read -> MINOR
  hv[5*PG]=1; printf("T7 host wrote page 5; guest read fault=%d\n",touch(5,0)); rd("p5");
  // CONTINUE on punched page -> errno?
  fallocate(mfd,FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE,5*PG,PG);
  cn=(struct uffdio_continue){.range={(unsigned long)gv+5*PG,PG},.mode=0}; r=ioctl(uffd,UFFDIO_CONTINUE,&cn); printf("  CONTINUE on punched r=%d errno=%d (%s)\n",r,errno,strerror(errno));
  struct uffdio_range wk={(unsigned long)gv+5*PG,PG}; ioctl(uffd,UFFDIO_WAKE,&wk); usleep(20000); printf("  after wake: op_done=%d\n",op_done); rd("refault"); 
  cp=(struct uffdio_copy){.dst=(unsigned long)gv+5*PG,.src=(unsigned long)buf,.len=PG,.mode=0}; r=ioctl(uffd,UFFDIO_COPY,&cp); printf("  COPY r=%d\n",r); waitdone("T7");
  cp=(struct uffdio_copy){.dst=(unsigned long)gv+5*PG,.src=(unsigned long)buf,.len=PG,.mode=0}; r=ioctl(uffd,UFFDIO_COPY,&cp); printf("T8 COPY onto present page r=%d errno=%d copy=%lld\n",r,errno,(long long)cp.copy);
  hv[6*PG]=1; cp=(struct uffdio_copy){.dst=(unsigned long)gv+6*PG,.src=(unsigned long)buf,.len=PG,.mode=0}; r=ioctl(uffd,UFFDIO_COPY,&cp); printf("T8b COPY onto page-cache page no pte r=%d errno=%d copy=%lld\n",r,errno,(long long)cp.copy);
  zp=(struct uffdio_zeropage){.range={(unsigned long)gv+6*PG,PG}}; r=ioctl(uffd,UFFDIO_ZEROPAGE,&zp); printf("T8c ZEROPAGE onto page-cache page r=%d errno=%d\n",r,errno);
  // 9 WP on none pte non-cached page (7), then write -> kind?
  wp=(struct uffdio_writeprotect){.range={(unsigned long)gv+7*PG,PG},.mode=UFFDIO_WRITEPROTECT_MODE_WP}; r=ioctl(uffd,UFFDIO_WRITEPROTECT,&wp); printf("T9 WP on unpopulated r=%d\n",r);
  printf("T9 write page 7: fault=%d\n",touch(7,1)); rd("p7");
  zp=(struct uffdio_zeropage){.range={(unsigned long)gv+7*PG,PG}}; r=ioctl(uffd,UFFDIO_ZEROPAGE,&zp); printf("  ZEROPAGE r=%d errno=%d\n",r,errno); usleep(20000);
  if(!op_done){ struct pollfd pf={uffd,POLLIN,0}; if(poll(&pf,1,100)>0){ rd("refault"); wp=(struct uffdio_writeprotect){.range={(unsigned long)gv+7*PG,PG},.mode=0}; ioctl(uffd,UFFDIO_WRITEPROTECT,&wp);} } waitdone("T9");
  // 10 unregister wakes a blocked thread?
  printf("T10 read page 9 then UNREGISTER: fault=%d\n",touch(9,0)); rd("p9");
  struct uffdio_range ur={(unsigned long)gv,32*PG}; r=ioctl(uffd,UFFDIO_UNREGISTER,&ur); printf("  UNREGISTER r=%d\n",r); waitdone("T10");
  // 11 closed-fd / released behaviour: register again, fault, close
  r=ioctl(uffd,UFFDIO_REGISTER,&reg); printf("T11 re-register r=%d\n",r); printf("  read page 10: fault=%d\n",touch(10,0)); rd("p10"); close(uffd); waitdone("T11 after close");
  op_page=999; pthread_join(t,0); printf("done\n"); return 0; }
