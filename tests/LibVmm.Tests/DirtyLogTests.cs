using ActorVmm.Testing;
using System.Collections.Concurrent;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.LibVmm.Tests;

/// <summary>
/// KVM's dirty log (with manual protection) against userfaultfd write-protect, the vmspace's method,
/// on the same real-mode guest: both must name exactly the pages the guest wrote, round after round.
/// </summary>
public sealed class DirtyLogTests
{
    private const ulong RamSize = 1 << 20;
    private const ulong Page = 4096;
    private const ulong Code = 0x1000;

    /// <summary>Writes one byte to each page (at gpa page * 4 KiB) and reads <paramref name="read"/>,
    /// then HLT; the next round's code follows the HLT.</summary>
    private static void Round(Assembler a, ulong[] written, ulong read)
    {
        foreach (var page in written)
        {
            a.mov(ax, (ushort)(page * Page >> 4));
            a.mov(ds, ax);
            a.mov(__byte_ptr[0x10], (byte)page);
        }
        a.mov(ax, (ushort)(read * Page >> 4));
        a.mov(ds, ax);
        a.mov(bl, __byte_ptr[0x20]);
        a.hlt();
    }

    [KvmFact]
    public void Kvm_dirty_log_and_uffd_write_protect_see_the_same_written_pages()
    {
        KvmRequirement.Check();
        ulong[][] rounds = [[0x20, 0x30, 0x31], [0x30, 0x50]];
        ulong[] reads = [0x40, 0x20];
        var a = new Assembler(16);
        for (var r = 0; r < rounds.Length; r++) Round(a, rounds[r], reads[r]);
        using var stream = new MemoryStream();
        a.Assemble(new StreamCodeWriter(stream), Code);

        using var kvm = Kvm.Open();
        Assert.True(kvm.CheckExtension(KvmCap.ManualDirtyLogProtect2) > 0, "KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2");
        using var vm = kvm.CreateVm();
        using var memory = new GuestMemoryMap();
        using var ram = new MemfdRegion("dirty-log-ram", RamSize);
        memory.Add("ram", new GuestPhysAddr(0), RamSize, ram);
        memory.Write(new GuestPhysAddr(Code), stream.ToArray());
        for (var p = 0x20UL; p < 0x60; p++) memory.Write(new GuestPhysAddr(p * Page), [0]); // resident: WP needs a page
        vm.EnableManualDirtyLogProtect();
        memory.RegisterWith(vm, logDirty: true);

        // userfaultfd write-protect on the guest view: every write fault is one dirty page.
        using var uffd = Userfaultfd.Create(UffdFeatures.PagefaultFlagWp | UffdFeatures.WpShmem);
        uffd.Register(ram.GuestView, RamSize, UffdRegisterMode.WriteProtect);
        var wpDirty = new ConcurrentQueue<ulong>();
        using var reader = new UffdReader(uffd, f =>
        {
            var offset = f.Address - (ulong)ram.GuestView;
            wpDirty.Enqueue(offset / Page);
            uffd.WriteProtect(ram.GuestView + (nint)(offset & ~(Page - 1)), Page, protect: false);
        }, e => throw e);

        using var vcpu = vm.CreateVcpu(0, CpuidPolicy.ForPlatform(kvm.GetSupportedCpuid()));
        var sregs = vcpu.GetSpecialRegisters();
        sregs.Cs.Selector = 0;
        sregs.Cs.Base = 0;
        vcpu.SetSpecialRegisters(sregs);
        var regs = vcpu.GetRegisters();
        regs.Rip = Code;
        regs.Rflags = 2;
        vcpu.SetRegisters(regs);

        var pages = RamSize / Page;
        vm.ClearDirtyLog(0, 0, (uint)pages, vm.GetDirtyLog(0, pages)); // the loader's writes are not the guest's
        for (var r = 0; r < rounds.Length; r++)
        {
            uffd.WriteProtect(ram.GuestView, RamSize, protect: true);
            wpDirty.Clear();
            VmExit exit;
            do exit = vcpu.Run(); while (exit is VmExit.Intr);
            Assert.IsType<VmExit.Hlt>(exit);

            var log = vm.GetDirtyLog(0, pages);
            var kvmDirty = VmHandle.DirtyPages(log).ToArray();
            Assert.Equal(rounds[r].Order(), kvmDirty);
            Assert.Equal(rounds[r].Order(), wpDirty.Distinct().Order());
            vm.ClearDirtyLog(0, 0, (uint)pages, log);
        }
        var check = new byte[1];
        memory.Read(new GuestPhysAddr(0x50 * Page + 0x10), check);
        Assert.Equal(0x50, check[0]);
    }
}
