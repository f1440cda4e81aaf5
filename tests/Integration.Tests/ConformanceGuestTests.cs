using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Guests;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Testing;
using Iced.Intel;
using Xunit;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Integration.Tests;

/// <summary>
/// Behaviour of the SDM that a guest OS relies on and that standard x86 conformance suites check:
/// CPUID.01H:EDX.APIC following IA32_APIC_BASE.EN, relocating the xAPIC page, and NMI latching.
/// Each guest reports through debug-exit: status 1 = as the SDM says, 3 = not.
/// </summary>
public sealed class ConformanceGuestTests
{
    private const ulong Code = 0x10_0000;
    private const ulong Trampoline = 0x9000;      // SIPI vector 0x09
    private const ushort ApReady = 0x8F20;        // real-mode DS = 0
    private const ulong NmiCount = 0x9F960;       // NMI handler entries (32 bits)
    private const ulong NmiNested = 0x9F964;      // entries while the handler ran (32 bits)
    private const ulong InNmi = 0x9F968;          // the handler runs (byte)
    private const ushort GatePort = 0x510;        // HostGate: guest and test take turns
    private const uint ApicBaseMsr = 0x1B;
    /// <summary>An address in the MMIO hole of these 16 MiB guests (the one a standard suite uses).</summary>
    private const uint AlternateApicBase = 0xBC00_0000;

    public static TheoryData<LapicMode> LapicModes => new() { LapicMode.Emulated, LapicMode.Assisted };


    private static LongModeImage Long(Action<Assembler> body)
    {
        var a = new Assembler(64);
        body(a);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    /// <summary>Debug-exit status 1 here; at <paramref name="bad"/>, placed right after, status 3.</summary>
    private static void ExitPassedElseAt(Assembler a, Label bad)
    {
        a.mov(al, 0);
        a.@out(0xF4, al);
        a.Label(ref bad);
        a.mov(al, 1);
        a.@out(0xF4, al);
    }

    /// <summary>Jumps to <paramref name="bad"/> unless CPUID.01H:EDX.APIC (bit 9) is <paramref name="set"/>. Clobbers RAX-RDX.</summary>
    private static void ExpectCpuidApic(Assembler a, bool set, Label bad)
    {
        a.mov(eax, 1);
        a.cpuid();
        a.bt(edx, 9);
        if (set) a.jnc(bad);
        else a.jc(bad);
    }

    /// <summary>
    /// SDM Vol 3A §10.4.3: with IA32_APIC_BASE.EN clear the processor is as one without an on-chip
    /// APIC, and CPUID.01H:EDX.APIC reads 0; set again, the bit reads 1. Under an emulated APIC the
    /// guest's WRMSR never reaches KVM, which reports the CPUID bit.
    /// </summary>
    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task Cpuid_reports_the_apic_only_while_ia32_apic_base_enables_it(LapicMode lapic)
    {
        var image = Long(a =>
        {
            var bad = a.CreateLabel();
            ExpectCpuidApic(a, set: true, bad);
            a.mov(ecx, ApicBaseMsr);
            a.rdmsr();
            a.mov(r12d, eax);
            a.mov(r13d, edx);
            a.and(eax, ~0xC00);                        // EN and EXTD clear: disabled globally
            a.wrmsr();
            ExpectCpuidApic(a, set: false, bad);
            a.mov(ecx, ApicBaseMsr);
            a.rdmsr();
            a.test(eax, 0x800);
            a.jnz(bad);
            a.mov(eax, r12d);                          // enabled again, xAPIC mode
            a.mov(edx, r13d);
            a.mov(ecx, ApicBaseMsr);
            a.wrmsr();
            ExpectCpuidApic(a, set: true, bad);
            ExitPassedElseAt(a, bad);
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, null, lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, run.Outcome.ToString());
    }

    /// <summary>
    /// SDM Vol 3A §10.4.5: IA32_APIC_BASE's base field relocates the xAPIC register page. The guest
    /// moves it to 0xBC000000: the version register answers there, a written register reads back
    /// there, and the old page at 0xFEE00000 reads as nothing (all-ones); moved back, the reverse.
    /// </summary>
    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task Relocating_the_apic_moves_its_register_page(LapicMode lapic)
    {
        var image = Long(a =>
        {
            var bad = a.CreateLabel();
            InterruptCode.EnableLocalApic(a);          // RBX = 0xFEE00000
            a.mov(r12d, __dword_ptr[rbx + 0x30]);      // the version register
            a.mov(ecx, ApicBaseMsr);
            a.rdmsr();
            a.mov(r13d, eax);
            a.mov(r14d, edx);
            a.and(eax, 0xFFF);                         // EN, BSP kept
            a.or(eax, unchecked((int)AlternateApicBase));
            a.wrmsr();
            a.mov(rsi, AlternateApicBase);
            a.cmp(__dword_ptr[rsi + 0x30], r12d);
            a.jne(bad);
            a.mov(__dword_ptr[rsi + 0xD0], 0x0300_0000);   // LDR
            a.cmp(__dword_ptr[rsi + 0xD0], 0x0300_0000);
            a.jne(bad);
            a.cmp(__dword_ptr[rbx + 0x30], -1);       // the old page: nothing there
            a.jne(bad);
            a.mov(__dword_ptr[rsi + 0xD0], 0);
            a.mov(eax, r13d);                          // back to 0xFEE00000
            a.mov(edx, r14d);
            a.mov(ecx, ApicBaseMsr);
            a.wrmsr();
            a.cmp(__dword_ptr[rbx + 0x30], r12d);
            a.jne(bad);
            a.cmp(__dword_ptr[rsi + 0x30], -1);
            a.jne(bad);
            ExitPassedElseAt(a, bad);
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, null, lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, run.Outcome.ToString());
    }

    /// <summary>
    /// The NMI handler: counts its entries at <see cref="NmiCount"/> and entries made while it ran
    /// at <see cref="NmiNested"/> (no processor makes one: NMIs are blocked until the handler's
    /// IRET, SDM Vol 3A §6.7.1). <paramref name="firstEntry"/> runs inside the first entry only.
    /// </summary>
    private static void NmiHandler(Assembler a, Label handler, Action<Assembler>? firstEntry = null)
    {
        var notNested = a.CreateLabel();
        var done = a.CreateLabel();
        a.Label(ref handler);
        a.push(rax);
        a.push(rcx);
        a.push(rdi);
        a.mov(rdi, (long)InNmi);
        a.cmp(__byte_ptr[rdi], 0);
        a.je(notNested);
        a.mov(rdi, (long)NmiNested);
        a.inc(__dword_ptr[rdi]);
        a.mov(rdi, (long)InNmi);
        a.Label(ref notNested);
        a.mov(__byte_ptr[rdi], 1);
        a.mov(rdi, (long)NmiCount);
        a.inc(__dword_ptr[rdi]);
        a.cmp(__dword_ptr[rdi], 1);
        a.jne(done);
        firstEntry?.Invoke(a);
        a.mov(ecx, 2_000);                             // a nested entry would show meanwhile
        var linger = a.CreateLabel();
        a.Label(ref linger);
        a.pause();
        a.dec(ecx);
        a.jnz(linger);
        a.Label(ref done);
        a.mov(rdi, (long)InNmi);
        a.mov(__byte_ptr[rdi], 0);
        a.pop(rdi);
        a.pop(rcx);
        a.pop(rax);
        a.iretq();                                     // no EOI for an NMI
    }

    /// <summary>Waits for the first NMI, lingers so that a late one would show, then expects
    /// <paramref name="expected"/> entries in all and none nested.</summary>
    private static void ExpectNmis(Assembler a, int expected, Label bad)
    {
        var first = a.CreateLabel();
        var linger = a.CreateLabel();
        a.mov(rdi, (long)NmiCount);
        a.Label(ref first);
        a.pause();
        a.cmp(__dword_ptr[rdi], 0);
        a.je(first);
        a.mov(ecx, 20_000);
        a.Label(ref linger);
        a.pause();
        a.dec(ecx);
        a.jnz(linger);
        a.cmp(__dword_ptr[rdi], expected);
        a.jne(bad);
        a.mov(rdi, (long)NmiNested);
        a.cmp(__dword_ptr[rdi], 0);
        a.jne(bad);
    }

    /// <summary>
    /// NMI latching (SDM Vol 3A §6.7.1): inside its NMI handler the guest sends itself two more
    /// NMIs. NMIs are blocked until the handler's IRET, so one is held and taken right after it,
    /// the other is lost (a processor latches one): two entries in all, never nested.
    /// </summary>
    [KvmTheory]
    [KvmData(LapicMode.Emulated)]
    [KvmData(LapicMode.Assisted, NotInKvmBox = BoxLimits.NmiIpiFromKvmApic)]
    public async Task An_nmi_that_arrives_inside_the_nmi_handler_is_held_until_its_iret(LapicMode lapic)
    {
        var image = Long(a =>
        {
            var nmi = a.CreateLabel();
            var bad = a.CreateLabel();
            InterruptCode.SetGate(a, 2, nmi);
            InterruptCode.EnableLocalApic(a);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrHigh], 0);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x400); // NMI to physical APIC 0: itself
            ExpectNmis(a, 2, bad);
            ExitPassedElseAt(a, bad);
            NmiHandler(a, nmi, first =>
            {
                first.mov(rdi, InterruptCode.LapicBase);
                first.mov(__dword_ptr[rdi + ApicOffsets.IcrLow], 0x400);
                first.mov(__dword_ptr[rdi + ApicOffsets.IcrLow], 0x400);
            });
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, null, lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, NmiReport(run));
    }

    /// <summary>
    /// Two NMIs that reach a vcpu while its host thread is off the CPU (a stall stands for a
    /// descheduled thread): vcpu 1 sends vcpu 0 two NMI IPIs, one after the other, while vcpu 0's
    /// thread is stalled. From the guest's view vcpu 0 runs all along (slowly), so it takes the
    /// first at once and latches the second during the handler (SDM Vol 3A §6.7.1): two entries,
    /// never nested. Merging them into one pending NMI would lose the second. With KVM's local
    /// APICs the NMIs never leave the kernel, so this is the emulated APIC's case.
    /// </summary>
    [KvmFact]
    public async Task Two_nmis_that_arrive_before_the_next_entry_are_both_taken_one_after_the_other()
    {
        var ap = InterruptCode.ApTrampoline(Trampoline, 0x40,
            a =>
            {
                var wait = a.CreateLabel();
                a.mov(__byte_ptr[ApReady], 1);
                a.mov(dx, GatePort);
                a.Label(ref wait);
                a.@in(al, dx);                         // until the test has stalled vcpu 0
                a.test(al, al);
                a.jz(wait);
                for (var i = 0; i < 2; i++)
                {
                    a.mov(ecx, 0x830);                 // x2APIC ICR: NMI to APIC 0
                    a.mov(eax, 0x400);
                    a.xor(edx, edx);
                    a.wrmsr();
                }
                a.mov(al, 2);
                a.mov(dx, GatePort);
                a.@out(dx, al);                        // step 2: both sent
            },
            a => a.iret());
        var image = Long(a =>
        {
            var nmi = a.CreateLabel();
            var bad = a.CreateLabel();
            var trampoline = a.CreateLabel();
            var ready = a.CreateLabel();
            InterruptCode.SetGate(a, 2, nmi);
            InterruptCode.StartAps(a, trampoline, ap.Length, Trampoline, destination: 1, shorthand: 0);
            a.mov(rdi, (long)ApReady);
            a.Label(ref ready);
            a.pause();
            a.cmp(__byte_ptr[rdi], 1);
            a.jne(ready);
            a.mov(al, 1);
            a.mov(dx, GatePort);
            a.@out(dx, al);                            // step 1: vcpu 1 waits at the gate
            ExpectNmis(a, 2, bad);
            ExitPassedElseAt(a, bad);
            NmiHandler(a, nmi);
            a.Label(ref trampoline);
            a.db(ap);
        });
        var gate = new HostGate();
        await using var run = await GuestRun.StartAsync(image, cpus: 2,
            devices: new DeviceSpec("gate", DeviceProtocol.Space.Port, GatePort, 1, _ => gate));
        await gate.ReachedAsync(1, run);
        var (_, stallEnded) = await run.StallStartedAsync("vcpu-0", TimeSpan.FromSeconds(2));
        gate.Release(1);
        await gate.ReachedAsync(2, run);
        Assert.False(stallEnded.IsCompleted, "vcpu 0's stall ended before vcpu 1 had sent both NMIs: nothing was tested");
        await stallEnded;
        await run.WaitAsync();
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, NmiReport(run));
    }

    private const ulong GpCount = 0x9F970;        // #GP taken (32 bits)
    private const ulong GpResume = 0x9F978;       // where the #GP handler returns to (64 bits)

    /// <summary>
    /// Runs what <paramref name="faulting"/> emits expecting <paramref name="gp"/>: a #GP (the handler
    /// counts it and returns past the code) or none. Jumps to <paramref name="bad"/> otherwise.
    /// Clobbers RAX and RDI.
    /// </summary>
    private static void Expect(Assembler a, bool gp, Label bad, Action<Assembler> faulting)
    {
        var resume = a.CreateLabel();
        a.mov(rdi, (long)GpCount);
        a.mov(__dword_ptr[rdi], 0);
        a.lea(rax, __[resume]);
        a.mov(rdi, (long)GpResume);
        a.mov(__qword_ptr[rdi], rax);
        faulting(a);
        a.Label(ref resume);
        a.mov(rdi, (long)GpCount);
        a.cmp(__dword_ptr[rdi], gp ? 1 : 0);
        a.jne(bad);
    }

    /// <summary>#GP: counts it and returns to the address at <see cref="GpResume"/> (error code dropped).</summary>
    private static void GpHandler(Assembler a, Label handler)
    {
        a.Label(ref handler);
        a.add(rsp, 8);                                 // the error code
        a.push(rdi);
        a.mov(rdi, (long)GpCount);
        a.inc(__dword_ptr[rdi]);
        a.mov(rdi, (long)GpResume);
        a.mov(rdi, __qword_ptr[rdi]);
        a.mov(__qword_ptr[rsp + 8], rdi);              // the interrupted RIP
        a.pop(rdi);
        a.iretq();
    }

    /// <summary>
    /// A CPU model (<c>--cpu</c>) decides what CPUID shows and what the processor then allows
    /// (SDM Vol 2A CPUID; Vol 3A §10.12.1 x2APIC, §10.5.4.1 TSC-deadline mode, §4.10.1 PCIDs).
    /// With <c>host,-x2apic,-pcid,-tsc-deadline</c> the three CPUID bits are clear, IA32_APIC_BASE.EXTD
    /// is reserved (#GP), CR4.PCIDE is reserved (#GP), and the LVT timer's mode bit 18 is reserved
    /// (a write of TSC-deadline mode reads back without it). With <c>host</c> the x2APIC is offered
    /// and can be enabled (on any KVM: KVM emulates it).
    /// </summary>
    [KvmTheory]
    [InlineData(LapicMode.Emulated, "host,-x2apic,-pcid,-tsc-deadline")]
    [InlineData(LapicMode.Assisted, "host,-x2apic,-pcid,-tsc-deadline")]
    [InlineData(LapicMode.Emulated, "host")]
    [InlineData(LapicMode.Assisted, "host")]
    public async Task A_cpu_model_hides_features_from_cpuid_and_the_processor_then_refuses_them(LapicMode lapic, string cpu)
    {
        var model = CpuModel.Parse(cpu);
        var hidden = model.Hides("x2apic");
        var image = Long(a =>
        {
            var gp = a.CreateLabel();
            var bad = a.CreateLabel();
            InterruptCode.SetGate(a, 13, gp);
            a.mov(eax, 1);
            a.cpuid();
            a.mov(r12d, ecx);
            InterruptCode.EnableLocalApic(a);          // RBX = the APIC page (after CPUID, which writes EBX)
            a.test(r12d, 1 << 21);                     // x2APIC
            if (hidden) a.jnz(bad);
            else a.jz(bad);
            if (hidden)
            {
                a.test(r12d, (1 << 17) | (1 << 24));   // PCID, TSC-deadline
                a.jnz(bad);
                Expect(a, gp: true, bad, f =>
                {
                    f.mov(rax, cr4);
                    f.or(eax, 1 << 17);                // CR4.PCIDE
                    f.mov(cr4, rax);
                });
                a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x5_0041); // TSC-deadline mode, masked
                a.test(__dword_ptr[rbx + ApicOffsets.LvtTimer], 1 << 18);
                a.jnz(bad);
            }
            Expect(a, gp: hidden, bad, f =>
            {
                f.mov(ecx, ApicBaseMsr);
                f.rdmsr();
                f.or(eax, 0xC00);                      // EN | EXTD: x2APIC mode
                f.wrmsr();
            });
            ExitPassedElseAt(a, bad);
            GpHandler(a, gp);
        });
        var spec = new VmSpec("guest", 16 << 20, 1, image, Lapic: lapic) { Cpu = model };
        await using var run = await GuestRun.StartAsync(spec);
        await run.WaitAsync();
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 },
            $"{run.Outcome}; #GP taken {run.Vm.Memory.ReadUInt64(new GuestPhysAddr(GpCount)) & 0xFFFF_FFFF} times in the last check");
    }

    private static string NmiReport(GuestRun run) =>
        $"{run.Outcome}; {run.Vm.Memory.ReadUInt64(new GuestPhysAddr(NmiCount)) & 0xFFFF_FFFF} NMI handler entries, " +
        $"{run.Vm.Memory.ReadUInt64(new GuestPhysAddr(NmiNested)) & 0xFFFF_FFFF} nested";
}
