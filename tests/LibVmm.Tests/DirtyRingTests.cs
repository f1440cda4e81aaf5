using ActorVmm.Testing;
using System.Collections.Concurrent;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.LibVmm.Tests;

/// <summary>
/// KVM's dirty ring on real guests: the harvest names exactly the pages the guest wrote (the same
/// as userfaultfd write-protect on the same run), round after round; a ring too small for a run
/// makes KVM_RUN exit with KVM_EXIT_DIRTY_RING_FULL, and harvesting lets the vcpu go on.
/// KVM checks for a full ring when it enters the guest: on kvm_pvm a guest loop that never exits
/// runs on emulated without re-entering, so the guests here leave the guest (port I/O) now and then.
/// </summary>
public sealed class DirtyRingTests
{
    private const ulong RamSize = 1 << 20;
    private const ulong Page = 4096;
    private const ulong Code = 0x1000;

    private static byte[] Assemble(Action<Assembler> emit)
    {
        var a = new Assembler(16);
        emit(a);
        using var stream = new MemoryStream();
        a.Assemble(new StreamCodeWriter(stream), Code);
        return stream.ToArray();
    }

    /// <summary>A 1 MiB real-mode VM with a dirty ring of <paramref name="ringEntries"/> and its RAM logged.</summary>
    private sealed class RingVm : IDisposable
    {
        public Kvm Kvm { get; } = Kvm.Open();
        public VmHandle Vm { get; }
        public GuestMemoryMap Memory { get; } = new();
        public MemfdRegion Ram { get; } = new("dirty-ring-ram", RamSize);
        public VcpuHandle Vcpu { get; }

        public RingVm(uint ringEntries, byte[] code, Action<GuestMemoryMap>? load = null)
        {
            Vm = Kvm.CreateVm();
            Vm.EnableDirtyRing(ringEntries);
            Memory.Add("ram", new GuestPhysAddr(0), RamSize, Ram, owns: false);
            Memory.Write(new GuestPhysAddr(Code), code);
            load?.Invoke(Memory);
            Memory.RegisterWith(Vm, logDirty: true);
            Vcpu = Vm.CreateVcpu(0, CpuidPolicy.ForPlatform(Kvm.GetSupportedCpuid()));
            var sregs = Vcpu.GetSpecialRegisters();
            sregs.Cs.Selector = 0;
            sregs.Cs.Base = 0;
            Vcpu.SetSpecialRegisters(sregs);
            var regs = Vcpu.GetRegisters();
            regs.Rip = Code;
            regs.Rflags = 2;
            Vcpu.SetRegisters(regs);
        }

        public void Dispose()
        {
            Vcpu.Dispose();
            Vm.Dispose();
            Memory.Dispose();
            Ram.Dispose();
            Kvm.Dispose();
        }
    }

    [KvmFact]
    public void Dirty_ring_and_uffd_write_protect_see_the_same_written_pages()
    {
        KvmRequirement.Check();
        ulong[][] rounds = [[0x20, 0x30, 0x31], [0x30, 0x50], [0x21]];
        var code = Assemble(a =>
        {
            foreach (var written in rounds)
            {
                foreach (var page in written)
                {
                    a.mov(ax, (ushort)(page * Page >> 4));
                    a.mov(ds, ax);
                    a.mov(__byte_ptr[0x10], (byte)page);
                }
                a.mov(ax, (ushort)(0x40 * Page >> 4)); // and a read, which neither may report
                a.mov(ds, ax);
                a.mov(bl, __byte_ptr[0x20]);
                a.hlt();
            }
        });
        using var vm = new RingVm(DirtyRing.MinEntries, code,
            load: m => { for (var p = 0x20UL; p < 0x60; p++) m.Write(new GuestPhysAddr(p * Page), [0]); }); // resident: WP needs a page
        Assert.NotNull(vm.Vcpu.DirtyRing);
        Assert.Equal(DirtyRing.MinEntries, vm.Vcpu.DirtyRing.Entries);

        using var uffd = Userfaultfd.Create(UffdFeatures.PagefaultFlagWp | UffdFeatures.WpShmem);
        uffd.Register(vm.Ram.GuestView, RamSize, UffdRegisterMode.WriteProtect);
        var wpDirty = new ConcurrentQueue<ulong>();
        using var reader = new UffdReader(uffd, f =>
        {
            var offset = f.Address - (ulong)vm.Ram.GuestView;
            wpDirty.Enqueue(offset / Page);
            uffd.WriteProtect(vm.Ram.GuestView + (nint)(offset & ~(Page - 1)), Page, protect: false);
        }, e => throw e);

        Assert.Empty(vm.Vcpu.HarvestDirtyRing().Gfns); // a fresh slot starts clean: the loader's writes are not the guest's
        foreach (var written in rounds)
        {
            uffd.WriteProtect(vm.Ram.GuestView, RamSize, protect: true);
            wpDirty.Clear();
            VmExit exit;
            do exit = vm.Vcpu.Run(); while (exit is VmExit.Intr);
            Assert.IsType<VmExit.Hlt>(exit);

            var ring = vm.Vcpu.HarvestDirtyRing();
            Assert.False(ring.RingWasFull);
            Assert.Equal(written.Order(), ring.Gfns.Order()); // each page once: reset re-armed it after the last round
            Assert.Equal(written.Order(), wpDirty.Distinct().Order());
        }
        var check = new byte[1];
        vm.Memory.Read(new GuestPhysAddr(0x50 * Page + 0x10), check);
        Assert.Equal(0x50, check[0]);
    }

    [KvmFact]
    public void A_full_ring_exits_to_user_space_and_the_vcpu_goes_on_after_a_harvest()
    {
        KvmRequirement.Check();
        const ushort first = 0x10, end = 0x100; // 240 pages: more than a 256-entry ring takes before it is full
        const byte port = 0x80;
        var code = Assemble(a =>
        {
            var loop = a.CreateLabel();
            var noExit = a.CreateLabel();
            a.mov(cx, first);
            a.Label(ref loop);
            a.mov(ax, cx);
            a.shl(ax, 8);                 // segment of page cx: cx * 4096 / 16
            a.mov(ds, ax);
            a.mov(__byte_ptr[0x10], cl);
            a.test(cl, 0x0F);
            a.jnz(noExit);
            a.@out(port, al);             // every 16 pages: out to user space and back in
            a.Label(ref noExit);
            a.inc(cx);
            a.cmp(cx, end);
            a.jne(loop);
            a.hlt();
        });
        using var vm = new RingVm(DirtyRing.MinEntries, code);

        var harvested = new List<ulong>();
        var fullExits = 0;
        var ioExits = 0;
        while (true)
        {
            var exit = vm.Vcpu.Run();
            if (exit is VmExit.Intr) continue;
            if (exit is VmExit.Io { Port: port })
            {
                Assert.True(++ioExits <= 16, "the guest looped");
                continue;
            }
            if (exit is VmExit.DirtyRingFull)
            {
                fullExits++;
                var harvest = vm.Vcpu.HarvestDirtyRing();
                Assert.NotEmpty(harvest.Gfns); // KVM waits for a harvest: an empty one would loop forever
                Assert.False(harvest.RingWasFull); // the reserve took the writes between two entries
                harvested.AddRange(harvest.Gfns);
                continue;
            }
            Assert.IsType<VmExit.Hlt>(exit);
            break;
        }
        var last = vm.Vcpu.HarvestDirtyRing();
        Assert.False(last.RingWasFull);
        harvested.AddRange(last.Gfns);

        Assert.True(fullExits >= 1, "a 256-entry ring took 240 dirty pages without a ring-full exit");
        var expected = Enumerable.Range(first, end - first).Select(p => (ulong)p).ToArray();
        // Below the data pages only the code's own page may show (kvm_amd reports it dirty after emulating).
        Assert.All(harvested.Where(g => g < first), g => Assert.Equal(Code / Page, g));
        // Every page, none lost; a page may come twice (kvm_amd can log a GFN again across a reset).
        Assert.Equal(expected, harvested.Where(g => g >= first).Distinct().Order());
        var check = new byte[1];
        vm.Memory.Read(new GuestPhysAddr(0xFF * Page + 0x10), check);
        Assert.Equal(0xFF, check[0]); // the last write ran: the vcpu went on after each harvest
    }

    [KvmFact]
    public void The_ring_is_refused_clearly_after_a_vcpu_exists_or_with_a_bad_size()
    {
        KvmRequirement.Check();
        using var kvm = Kvm.Open();
        using (var vm = kvm.CreateVm())
        {
            var tooSmall = Assert.Throws<KvmException>(() => vm.EnableDirtyRing(128));
            Assert.Contains("power of two of at least 256", tooSmall.Message);
            var notPow2 = Assert.Throws<KvmException>(() => vm.EnableDirtyRing(1000));
            Assert.Contains("power of two", notPow2.Message);
            var max = (uint)Math.Max(kvm.CheckExtension(KvmCap.DirtyLogRing), kvm.CheckExtension(KvmCap.DirtyLogRingAcqRel)) / 16;
            var tooBig = Assert.Throws<KvmException>(() => vm.EnableDirtyRing(max * 2));
            Assert.Contains("larger than this KVM allows", tooBig.Message);
            Assert.Equal(0u, vm.DirtyRingBytes);
        }
        using (var vm = kvm.CreateVm())
        {
            using var vcpu = vm.CreateVcpu(0, CpuidPolicy.ForPlatform(kvm.GetSupportedCpuid()));
            var late = Assert.Throws<KvmException>(() => vm.EnableDirtyRing(4096));
            Assert.Contains("before the first vcpu", late.Message);
            Assert.Null(vcpu.DirtyRing);
            Assert.Equal(DirtyRingHarvest.Empty, vcpu.HarvestDirtyRing());
        }
    }
}
