using System.Buffers.Binary;
using System.Diagnostics;
using ActorVmm.Testing;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.LibVmm.Tests;

/// <summary>
/// A vcpu's and a VM's KVM state saved, then restored into a NEW VM and vcpu built the same way, with a
/// copy of the guest memory: the guest goes on where it stopped (real-mode guests assembled with Iced).
/// </summary>
public sealed class VcpuStateTests
{
    private const ulong RamSize = 0x1_0000;
    private const ulong CodeAddress = 0x1000, NmiHandler = 0x0800, NmiVectorEntry = 2 * 4;
    private const byte CountPort = 0x10, StatusPort = 0x11;
    private const byte NmiSeen = 0x4E, Done = 0xD0, Fail = 0xFA;
    private const uint Counted = 5, Final = 12;

    // Guest data: the counter, the values it loads, what it stores for the host to check.
    private const ushort Counter = 0x3000;
    private const ushort XmmIn = 0x3200, FcwIn = 0x3210, MxcsrIn = 0x3214;
    private const ushort TscStart = 0x3300, TscEnd = 0x3308, St0 = 0x3310, St1 = 0x3318, Xmm3 = 0x3320, Mxcsr = 0x3330,
        Fcw = 0x3334, Dr0 = 0x3338, Dr3 = 0x333C, KernelGsBase = 0x3340, Star = 0x3348, SysenterEsp = 0x3350,
        SystemTimeMsr = 0x3358, Tpr = 0x3360, DeadlineRead = 0x3368, DeadlineWritten = 0x3370;
    private const ushort Pvti = 0x5000, WallClock = 0x5100;

    private const ushort FcwValue = 0x0F7F;            // all exceptions masked, 64-bit precision, RC = truncate
    private const uint MxcsrValue = 0x3F80;            // all exceptions masked, RC = round down
    private const ulong KernelGsBaseValue = 0xFFFF_8880_1234_5678, StarValue = 0x0023_0010_0000_0000; // a canonical address
    private const ulong SysenterEspValue = 0x7000;
    private const uint Dr0Value = 0x1234_5678, Dr3Value = 0x00AB_C000;
    private const ulong SystemTimeValue = Pvti | 1;     // kvmclock enabled, time page at 0x5000
    private const ulong TprValue = 0x20;
    private static readonly byte[] XmmPattern = Convert.FromHexString("00112233445566778899AABBCCDDEEFF");

    private static readonly TimeSpan Paused = TimeSpan.FromMilliseconds(200);

    /// <summary>
    /// The guest counts in EBX and in memory, one OUT per step; before counting it loads x87, SSE,
    /// MXCSR, FCW, DR0/DR3, KERNEL_GS_BASE, STAR, SYSENTER_ESP, turns kvmclock on and, with KVM's
    /// local APIC, x2APIC with a TPR and an armed TSC deadline. It is saved after step 5 with an NMI
    /// queued, restored into a new VM, and must take the NMI, count 6..12 without a gap, and read back
    /// every value it loaded, with its TSC and kvmclock never behind their saved values and its
    /// kvmclock wall clock unchanged.
    /// </summary>
    [KvmTheory]
    [KvmData(false)]
    [KvmData(true)]
    public void A_guest_restored_into_a_new_vm_continues_exactly_where_it_was_saved(bool kvmLocalApic)
    {
        KvmRequirement.Check();
        byte[] memory;
        VcpuKvmState saved;
        VmKvmState clock;
        ulong pvtiBefore, wallBefore;
        using (var a = new Guest(kvmLocalApic))
        {
            a.Load(Program(kvmLocalApic));
            for (var i = 1u; i <= Counted; i++)
                Assert.Equal(new VmExit.Io(true, CountPort, 4, 1, i, null), a.NextExit());
            pvtiBefore = a.Read64(Pvti + 8);
            wallBefore = a.WallClockNs();
            Assert.NotEqual(0ul, pvtiBefore); // KVM wrote the time page: kvmclock is on
            Thread.Sleep(Paused);             // the VM's clocks run on while it is paused
            a.Vcpu.InjectNmi();
            clock = a.Vm.SaveClock();
            saved = a.Vcpu.SaveState();
            memory = a.Memory();
        }
        var savedMsrs = string.Join(", ", saved.Msrs.Select(m => $"{m.Index:X}={m.Value:X}"));
        Assert.True(saved.Msr(SavedMsrs.KernelGsBase) == KernelGsBaseValue, $"saved MSRs: {savedMsrs}");
        Assert.Equal(1, saved.GetVcpuEvents().NmiPending);
        Assert.Equal(kvmLocalApic, saved.Lapic is not null);

        using var b = new Guest(kvmLocalApic);
        b.SetMemory(memory);
        b.Vm.RestoreClock(clock, bringWallClockToNow: true);
        b.Vcpu.RestoreState(saved);

        // What the guest did after the restore: the NMI first, then the count from 6, then done.
        var exits = new List<string>();
        for (var i = 0; i < 20; i++)
        {
            var exit = b.NextExit();
            exits.Add(exit is VmExit.Io io ? $"out {io.Port:X}={io.Value:X}" : exit.ToString()!);
            if (exit is not VmExit.Io { Port: CountPort }) { if (exit is not VmExit.Io { Value: NmiSeen }) break; }
        }
        string[] expected = [$"out {StatusPort:X}={NmiSeen:X}", .. Enumerable.Range((int)Counted + 1, (int)(Final - Counted)).Select(i => $"out {CountPort:X}={i:X}"), $"out {StatusPort:X}={Done:X}"];
        Assert.Equal(expected, exits);

        // Every value the guest loaded before the save, as it read them back after the restore.
        var wrong = new List<string>();
        void Check<T>(string what, T want, T got) { if (!EqualityComparer<T>.Default.Equals(want, got)) wrong.Add($"{what}: {got}, not {want}"); }
        Check("counter in memory", Final, (uint)b.Read64(Counter));
        Check("st0", 1.0, BitConverter.Int64BitsToDouble((long)b.Read64(St0)));
        Check("st1", Math.PI, BitConverter.Int64BitsToDouble((long)b.Read64(St1)));
        Check("xmm3", Convert.ToHexString(XmmPattern), Convert.ToHexString(b.Bytes(Xmm3, 16)));
        Check("mxcsr", MxcsrValue, (uint)b.Read64(Mxcsr));
        Check("fcw", FcwValue, (ushort)b.Read64(Fcw));
        Check("dr0", Dr0Value, (uint)b.Read64(Dr0));
        Check("dr3", Dr3Value, (uint)b.Read64(Dr3));
        Check("KERNEL_GS_BASE", KernelGsBaseValue, b.Read64(KernelGsBase));
        Check("STAR", StarValue, b.Read64(Star));
        Check("SYSENTER_ESP", SysenterEspValue, b.Read64(SysenterEsp));
        Check("MSR_KVM_SYSTEM_TIME_NEW", SystemTimeValue, b.Read64(SystemTimeMsr));
        if (kvmLocalApic)
        {
            Check("x2APIC TPR", TprValue, b.Read64(Tpr));
            if (b.TscDeadlineShown)
            {
                Check("TSC deadline armed", true, b.Read64(DeadlineWritten) != 0);
                Check("TSC deadline", b.Read64(DeadlineWritten), b.Read64(DeadlineRead));
            }
        }
        // The TSC continues from its saved value: not from the new vcpu's creation, not backwards.
        var savedTsc = saved.Tsc ?? 0;
        Check("TSC saved", true, savedTsc != 0);
        Check($"TSC before the save {b.Read64(TscStart)} below the saved {savedTsc}", true, b.Read64(TscStart) < savedTsc);
        Check($"TSC after the restore {b.Read64(TscEnd)} not below the saved {savedTsc}", true, b.Read64(TscEnd) >= savedTsc);
        // kvmclock: never behind what the guest saw before, and its wall clock (boot time) unchanged.
        var pvtiAfter = b.Read64(Pvti + 8);
        // What the guest reads never goes back, and the restored clock is at least the saved one. (Not
        // checked: that KVM_GET_CLOCK is at least the time page the vcpu saw before; in the KVM box it
        // was up to 176 ms below it, KVM_CLOCK_TSC_STABLE set, a KVM inconsistency under emulation.)
        Check($"kvmclock {pvtiBefore} before <= {pvtiAfter} after", true, pvtiAfter >= pvtiBefore);
        Check($"kvmclock {clock.Clock} saved <= {pvtiAfter} after", true, pvtiAfter >= clock.Clock);
        var wallMoved = ((long)b.WallClockNs() - (long)wallBefore) / 1e6;
        Check($"kvmclock wall clock moved {wallMoved} ms (< 50)", true, Math.Abs(wallMoved) < 50);
        Assert.True(wrong.Count == 0, string.Join("; ", wrong) + $" (saved MSRs: {savedMsrs})");
    }

    /// <summary>KVM's one-second TSC synchronization can put a restored TSC below its saved value
    /// (here: the second vcpu's write, 0.5 s ahead of the first, is matched to the first's offset);
    /// RestoreState moves the offset so the TSC never reads below what was saved.</summary>
    [KvmFact]
    public void A_restored_tsc_never_reads_below_its_saved_value_when_kvm_matches_it_to_another_vcpu()
    {
        KvmRequirement.Check();
        using var kvm = Kvm.Open();
        using var vm = kvm.CreateVm();
        var cpuid = CpuidPolicy.ForPlatform(kvm.GetSupportedCpuid());
        using var v0 = vm.CreateVcpu(0, cpuid);
        using var v1 = vm.CreateVcpu(1, cpuid);
        Assert.True(v1.HasTscOffsetAttribute(), "this KVM has no KVM_VCPU_TSC_OFFSET (Linux 5.16+)");
        var second = (ulong)v0.GetTscKhz() * 1000;

        var restore = Stopwatch.StartNew();
        v0.SetMsrs(new KvmMsrEntry { Index = SavedMsrs.Tsc, Data = v0.GetGuestTsc() + 5 * second });
        var state = v1.SaveState();
        var target = v0.GetGuestTsc() + second / 2;
        state = state with { Msrs = [.. state.Msrs.Select(m => m.Index == SavedMsrs.Tsc ? m with { Value = target } : m)] };
        v1.RestoreState(state);

        var now = v1.GetGuestTsc();
        Assert.True(now >= target, $"vcpu 1's TSC {now} is below its saved value {target}");
        // KVM's synchronization may put it ahead: by at most its one second plus, where the host's TSC
        // is unstable, the time since vcpu 0's write (it adds that instead of sharing the offset).
        var bound = second + (ulong)(restore.Elapsed.TotalSeconds * second);
        Assert.True(now - target < bound, $"vcpu 1's TSC {now} jumped {(now - target) / (double)second} s past its saved value");
    }

    /// <summary>The kvmclock of a restored VM continues from the saved value, plus the host realtime
    /// elapsed when the wall clock is brought to now; never less than saved.</summary>
    [KvmFact]
    public void A_restored_kvmclock_continues_and_gains_the_elapsed_realtime_only_when_asked()
    {
        KvmRequirement.Check();
        using var kvm = Kvm.Open();
        VmKvmState saved;
        using (var a = kvm.CreateVm())
            saved = a.SaveClock();
        var pause = Stopwatch.StartNew();
        Thread.Sleep(Paused);
        pause.Stop();

        using var toNow = kvm.CreateVm();
        toNow.RestoreClock(saved, bringWallClockToNow: true);
        var advanced = toNow.GetClock().Clock;
        using var paused = kvm.CreateVm();
        paused.RestoreClock(saved, bringWallClockToNow: false);
        var continued = paused.GetClock().Clock;

        var pauseNs = (ulong)(pause.Elapsed.TotalMilliseconds * 1e6);
        Assert.True(advanced >= saved.Clock + pauseNs * 95 / 100,
            $"brought to now: {(advanced - saved.Clock) / 1e6} ms past the saved clock after a {pauseNs / 1e6} ms pause");
        Assert.True(continued >= saved.Clock, "the paused clock went back");
        Assert.True(continued - saved.Clock < pauseNs / 2,
            $"paused: the clock gained {(continued - saved.Clock) / 1e6} ms of a {pauseNs / 1e6} ms pause");
    }

    // ---- the guest ----------------------------------------------------------------------------

    private static byte[] Program(bool kvmLocalApic)
    {
        var a = new Assembler(16);
        var loop = a.CreateLabel();
        var fail = a.CreateLabel();
        a.xor(ax, ax);
        a.mov(ss, ax);
        a.mov(sp, (ushort)0x7000);
        // x87 and SSE on (SDM Vol 3A §13.1: CR0.EM = 0, CR0.MP = 1, CR4.OSFXSR, CR4.OSXMMEXCPT).
        a.mov(eax, cr0);
        a.and(eax, ~0b0100);
        a.or(eax, 0b0010);
        a.mov(cr0, eax);
        a.mov(eax, cr4);
        a.or(eax, 0b0110_0000_0000);
        a.mov(cr4, eax);
        a.fninit();
        a.fldcw(__word_ptr[FcwIn]);
        a.fldpi();
        a.fld1();
        a.movdqu(xmm3, __xmmword_ptr[XmmIn]);
        a.ldmxcsr(__dword_ptr[MxcsrIn]);
        a.mov(eax, Dr0Value);
        a.mov(dr0, eax);
        a.mov(eax, Dr3Value);
        a.mov(dr3, eax);
        Wrmsr(a, SavedMsrs.KernelGsBase, KernelGsBaseValue);
        Wrmsr(a, SavedMsrs.Star, StarValue);
        Wrmsr(a, SavedMsrs.SysenterEsp, SysenterEspValue);
        Wrmsr(a, SavedMsrs.KvmSystemTimeNew, SystemTimeValue);
        Wrmsr(a, SavedMsrs.KvmWallClockNew, WallClock);
        if (kvmLocalApic)
        {
            const uint apicBase = 0x1B, x2apicTpr = 0x808, x2apicSvr = 0x80F, x2apicLvtTimer = 0x832;
            Wrmsr(a, apicBase, 0xFEE0_0000UL | 1UL << 11 | 1UL << 10);  // xAPIC global enable, then x2APIC
            Wrmsr(a, x2apicSvr, 0x1FF);
            Wrmsr(a, x2apicTpr, TprValue);
            Wrmsr(a, x2apicLvtTimer, 0b10UL << 17 | 1UL << 16 | 0x40); // TSC-deadline mode, masked
            a.rdtsc();
            a.add(edx, 0x100);                                    // 2^40 cycles ahead: never due here
            a.mov(__dword_ptr[DeadlineWritten], eax);
            a.mov(__dword_ptr[DeadlineWritten + 4], edx);
            a.mov(ecx, SavedMsrs.TscDeadline);
            a.wrmsr();
        }
        a.rdtsc();
        a.mov(__dword_ptr[TscStart], eax);
        a.mov(__dword_ptr[TscStart + 4], edx);
        a.xor(ebx, ebx);
        a.mov(__dword_ptr[Counter], ebx);
        a.Label(ref loop);
        a.mov(eax, __dword_ptr[Counter]);
        a.cmp(eax, ebx);
        a.jne(fail);
        a.inc(ebx);
        a.mov(__dword_ptr[Counter], ebx);
        a.mov(eax, ebx);
        a.@out(CountPort, eax);
        a.cmp(ebx, Final);
        a.jne(loop);
        // Read everything back for the host.
        a.rdtsc();
        a.mov(__dword_ptr[TscEnd], eax);
        a.mov(__dword_ptr[TscEnd + 4], edx);
        a.fstp(__qword_ptr[St0]);
        a.fstp(__qword_ptr[St1]);
        a.movdqu(__xmmword_ptr[Xmm3], xmm3);
        a.stmxcsr(__dword_ptr[Mxcsr]);
        a.fnstcw(__word_ptr[Fcw]);
        a.mov(eax, dr0);
        a.mov(__dword_ptr[Dr0], eax);
        a.mov(eax, dr3);
        a.mov(__dword_ptr[Dr3], eax);
        Rdmsr(a, SavedMsrs.KernelGsBase, KernelGsBase);
        Rdmsr(a, SavedMsrs.Star, Star);
        Rdmsr(a, SavedMsrs.SysenterEsp, SysenterEsp);
        Rdmsr(a, SavedMsrs.KvmSystemTimeNew, SystemTimeMsr);
        if (kvmLocalApic)
        {
            Rdmsr(a, 0x808, Tpr);
            Rdmsr(a, SavedMsrs.TscDeadline, DeadlineRead);
        }
        a.mov(al, Done);
        a.@out(StatusPort, al);
        a.hlt();
        a.Label(ref fail);
        a.mov(al, Fail);
        a.@out(StatusPort, al);
        a.hlt();
        return Assemble(a, CodeAddress);
    }

    /// <summary>The NMI handler (real-mode IVT vector 2): reports itself on the status port.</summary>
    private static byte[] NmiHandlerCode()
    {
        var a = new Assembler(16);
        a.push(ax);
        a.mov(al, NmiSeen);
        a.@out(StatusPort, al);
        a.pop(ax);
        a.iret();
        return Assemble(a, NmiHandler);
    }

    private static void Wrmsr(Assembler a, uint msr, ulong value)
    {
        a.mov(ecx, msr);
        a.mov(eax, (uint)value);
        a.mov(edx, (uint)(value >> 32));
        a.wrmsr();
    }

    private static void Rdmsr(Assembler a, uint msr, ushort to)
    {
        a.mov(ecx, msr);
        a.rdmsr();
        a.mov(__dword_ptr[to], eax);
        a.mov(__dword_ptr[to + 4], edx);
    }

    private static byte[] Assemble(Assembler a, ulong address)
    {
        using var stream = new MemoryStream();
        a.Assemble(new StreamCodeWriter(stream), address);
        return stream.ToArray();
    }

    /// <summary>A VM with 64 KiB of RAM and one real-mode vcpu at CS:IP = 0:0x1000, with or without
    /// KVM's local APIC (the split irqchip), the same CPUID every time.</summary>
    private sealed class Guest : IDisposable
    {
        private readonly Kvm _kvm;
        private readonly GuestMemoryMap _memory = new();
        public VmHandle Vm { get; }
        public VcpuHandle Vcpu { get; }
        public bool TscDeadlineShown { get; }

        public Guest(bool kvmLocalApic)
        {
            _kvm = Kvm.Open();
            Vm = _kvm.CreateVm();
            if (kvmLocalApic) Vm.EnableSplitIrqchip();
            _memory.Add("ram", new GuestPhysAddr(0), RamSize, new MemfdRegion("state-test-ram", RamSize));
            _memory.RegisterWith(Vm);
            // KVM's APIC takes the TSC-deadline mode only when CPUID shows it, which
            // KVM_GET_SUPPORTED_CPUID never reports (KVM_CAP_TSC_DEADLINE_TIMER says it is there).
            TscDeadlineShown = kvmLocalApic && _kvm.CheckExtension(KvmCap.TscDeadlineTimer) > 0;
            var policy = CpuidPolicy.ForModel(_kvm.GetSupportedCpuid(), CpuModel.Host,
                TscDeadlineShown ? [CpuModel.Feature("tsc-deadline")] : []);
            Vcpu = Vm.CreateVcpu(0, policy);
            var sregs = Vcpu.GetSpecialRegisters();
            sregs.Cs.Selector = 0;
            sregs.Cs.Base = 0;
            Vcpu.SetSpecialRegisters(sregs);
        }

        public void Load(byte[] code)
        {
            _memory.Write(new GuestPhysAddr(CodeAddress), code);
            _memory.Write(new GuestPhysAddr(NmiHandler), NmiHandlerCode());
            var entry = new byte[4];
            BinaryPrimitives.WriteUInt16LittleEndian(entry, (ushort)NmiHandler); // offset, segment 0
            _memory.Write(new GuestPhysAddr(NmiVectorEntry), entry);
            var data = new byte[0x20];
            XmmPattern.CopyTo(data, 0);
            BinaryPrimitives.WriteUInt16LittleEndian(data.AsSpan(FcwIn - XmmIn), FcwValue);
            BinaryPrimitives.WriteUInt32LittleEndian(data.AsSpan(MxcsrIn - XmmIn), MxcsrValue);
            _memory.Write(new GuestPhysAddr(XmmIn), data);
            var regs = Vcpu.GetRegisters();
            regs.Rip = CodeAddress;
            regs.Rflags = 0b10;
            Vcpu.SetRegisters(regs);
        }

        public byte[] Memory() => Bytes(0, (int)RamSize);

        public void SetMemory(byte[] image) => _memory.Write(new GuestPhysAddr(0), image);

        public byte[] Bytes(ulong address, int length)
        {
            var b = new byte[length];
            _memory.Read(new GuestPhysAddr(address), b);
            return b;
        }

        public ulong Read64(ulong address) => BinaryPrimitives.ReadUInt64LittleEndian(Bytes(address, 8));

        /// <summary>The kvmclock wall clock page (struct pvclock_wall_clock: version, sec, nsec) in ns:
        /// the host's realtime when the guest's kvmclock read 0.</summary>
        public ulong WallClockNs()
        {
            var w = Bytes(WallClock, 12);
            return BinaryPrimitives.ReadUInt32LittleEndian(w.AsSpan(4)) * 1_000_000_000UL + BinaryPrimitives.ReadUInt32LittleEndian(w.AsSpan(8));
        }

        /// <summary>Runs to the next exit; a stray signal (Intr) just re-enters.</summary>
        public VmExit NextExit()
        {
            for (var i = 0; i < 100; i++)
            {
                var exit = Vcpu.Run();
                if (exit is not VmExit.Intr) return exit;
            }
            throw new InvalidOperationException("KVM_RUN returned EINTR 100 times in a row");
        }

        public void Dispose()
        {
            Vcpu.Dispose();
            Vm.Dispose();
            _memory.Dispose();
            _kvm.Dispose();
        }
    }
}
