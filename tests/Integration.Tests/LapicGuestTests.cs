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
/// Real guests exercising the emulated local APICs (lapic = emulated): the LAPIC timer, a
/// self-IPI, an IPI from vcpu 0 to vcpu 1, INIT-SIPI bringing up APs. The BSP runs 64-bit code
/// (<see cref="LongModeImage"/>): it builds its own IDT entries and loads them with <c>lidt</c>,
/// enables its APIC through SVR, and its handlers end in <c>iretq</c>. APs start in real mode at
/// 0x9000 (SIPI vector 0x09) from a trampoline the BSP copies there. Interrupts come only as
/// injected external interrupts (never <c>int n</c>, see DESIGN §4).
/// </summary>
public sealed class LapicGuestTests
{
    private const ulong Code = 0x10_0000;
    private const ulong Flag = 0x9F900;          // set by a handler
    private const ulong Trampoline = 0x9000;     // SIPI vector 0x09
    private const ushort ApLock = 0x8F00;        // real-mode DS = 0: a byte lock,
    private const ushort ApCount = 0x8F04;       // the number of APs that printed,
    private const ushort ApReady = 0x8F08;       // and an AP's "my APIC is on" flag
    private const long LapicBase = InterruptCode.LapicBase;

    /// <summary>Every guest here runs with the emulated local APICs and with KVM's (split irqchip).</summary>
    public static TheoryData<LapicMode> LapicModes => new() { LapicMode.Emulated, LapicMode.Assisted };

    private static LongModeImage Long(Action<Assembler> body)
    {
        var a = new Assembler(64);
        body(a);
        return new LongModeImage(GuestCode.Assemble(a, Code), Code, Code);
    }

    private static void SetGate(Assembler a, byte vector, Label handler) => InterruptCode.SetGate(a, vector, handler);

    /// <summary>RBX = the local APIC page; SVR = 0x1FF (software enabled).</summary>
    private static void EnableApic(Assembler a) => InterruptCode.EnableLocalApic(a);

    /// <summary>A handler that sets <see cref="Flag"/>, EOIs and returns; past <paramref name="hlt"/>
    /// (of <see cref="WaitFlagThenExit"/>) if it interrupted that hlt (see <see cref="InterruptCode.ReturnPastInterruptedHlt"/>).</summary>
    private static void FlagHandler(Assembler a, Label handler, Label? hlt = null)
    {
        a.Label(ref handler);
        if (hlt is { } sleep) InterruptCode.ReturnPastInterruptedHlt(a, sleep);
        a.push(rdi);
        a.mov(rdi, (long)Flag);
        a.mov(__byte_ptr[rdi], 1);
        a.mov(rdi, LapicBase);
        a.mov(__dword_ptr[rdi + 0xB0], 0); // EOI
        a.pop(rdi);
        a.iretq();
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

    /// <summary>Sleeps (sti; hlt) until <see cref="Flag"/> is set, then exits through debug-exit with
    /// status 1. Returns the label of its hlt, for the handlers that wake it.</summary>
    private static Label WaitFlagThenExit(Assembler a)
    {
        var wait = a.CreateLabel();
        var hlt = a.CreateLabel();
        a.mov(rdi, (long)Flag);
        a.Label(ref wait);
        InterruptCode.SleepWithInterruptsOn(a, hlt);
        a.cmp(__byte_ptr[rdi], 1);
        a.jne(wait);
        a.mov(al, 0);
        a.@out(0xF4, al);
        return hlt;
    }

    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task Lapic_timer_one_shot_interrupts_the_guest(LapicMode lapic)
    {
        var image = Long(a =>
        {
            var handler = a.CreateLabel();
            SetGate(a, 0x41, handler);
            EnableApic(a);
            a.mov(__dword_ptr[rbx + ApicOffsets.TimerDivide], 0b1011);  // divide by 1
            a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x41);    // LVT timer: one-shot, vector 0x41, unmasked
            a.mov(__dword_ptr[rbx + ApicOffsets.TimerInitialCount], 100_000); // initial count: 100 µs at 1 GHz
            var hlt = WaitFlagThenExit(a);
            FlagHandler(a, handler, hlt);
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, null, lapic);
        Assert.Equal(VmProtocol.OutcomeKind.DebugExit, run.Outcome.Kind);
        Assert.Equal(1, run.Outcome.ExitCode);
    }

    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task Lapic_timer_tsc_deadline_interrupts_the_guest_after_its_own_tsc_passes_the_deadline(LapicMode lapic)
    {
        var image = Long(a =>
        {
            var handler = a.CreateLabel();
            var bad = a.CreateLabel();
            SetGate(a, 0x41, handler);
            EnableApic(a);
            a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x4_0041);    // LVT timer: TSC-deadline mode (10b), vector 0x41
            a.rdtsc();
            a.shl(rdx, 32);
            a.or(rax, rdx);
            a.mov(r12, rax);                              // the TSC now
            a.add(rax, 30_000_000);                       // deadline: 30M TSC counts later (10-30 ms)
            a.mov(r13, rax);
            a.mov(rdx, rax);
            a.shr(rdx, 32);
            a.mov(ecx, 0x6E0);                            // IA32_TSC_DEADLINE
            a.wrmsr();
            var hlt = WaitFlagThenExitOr(a, bad);
            // The handler ran: the TSC must have reached the deadline by then.
            a.Label(ref handler);
            InterruptCode.ReturnPastInterruptedHlt(a, hlt);
            a.push(rax);
            a.push(rdx);
            a.push(rdi);
            a.rdtsc();
            a.shl(rdx, 32);
            a.or(rax, rdx);
            a.cmp(rax, r13);
            a.jb(bad);                                    // too early
            a.mov(rdi, (long)Flag);
            a.mov(__byte_ptr[rdi], 1);
            a.mov(rdi, LapicBase);
            a.mov(__dword_ptr[rdi + 0xB0], 0);
            a.pop(rdi);
            a.pop(rdx);
            a.pop(rax);
            a.iretq();
            a.Label(ref bad);
            a.mov(al, 1);
            a.@out(0xF4, al);
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, null, lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, run.Outcome.ToString());
    }

    /// <summary>Sleeps until <see cref="Flag"/> is set, then exits with status 1; <paramref name="bad"/> is
    /// the caller's. Returns the label of its hlt.</summary>
    private static Label WaitFlagThenExitOr(Assembler a, Label bad)
    {
        var wait = a.CreateLabel();
        var hlt = a.CreateLabel();
        a.mov(rdi, (long)Flag);
        a.Label(ref wait);
        InterruptCode.SleepWithInterruptsOn(a, hlt);
        a.cli();
        a.cmp(__byte_ptr[rdi], 1);
        a.jne(wait);
        a.mov(al, 0);
        a.@out(0xF4, al);
        return hlt;
    }

    /// <summary>
    /// <see cref="InterruptCode.ReturnPastInterruptedHlt"/> on a processor, which never interrupts
    /// inside STI's shadow: the guest enters a handler through interrupt frames it pushes itself
    /// (SS, RSP, RFLAGS with IF=0, CS, RIP), as a processor would push them. With RIP elsewhere the
    /// handler must return there and count nothing; with RIP on the <c>hlt</c> of
    /// <see cref="InterruptCode.SleepWithInterruptsOn"/> it must return past it and count one. Status
    /// 1: both; status 3: a wrong count; a return to the <c>hlt</c> would halt the VM with
    /// interrupts off.
    /// </summary>
    [KvmFact]
    public async Task A_handler_that_interrupted_the_hlt_of_sti_hlt_returns_past_it_and_counts_it()
    {
        const ulong counter = 0x9F930;
        var image = Long(a =>
        {
            var hlt = a.CreateLabel();
            var handler = a.CreateLabel();
            var elsewhere = a.CreateLabel();
            var start = a.CreateLabel();
            var bad = a.CreateLabel();
            a.jmp(start);
            InterruptCode.SleepWithInterruptsOn(a, hlt); // reached only through a frame
            a.mov(rdi, (long)counter);
            a.cmp(__dword_ptr[rdi], 1);
            a.jne(bad);
            a.mov(al, 0);
            a.@out(0xF4, al);
            a.Label(ref start);
            a.mov(rdi, (long)counter);
            a.mov(__dword_ptr[rdi], 0);
            EnterAsIfInterruptedAt(a, handler, elsewhere);
            a.Label(ref elsewhere);
            a.mov(rdi, (long)counter);
            a.cmp(__dword_ptr[rdi], 0);
            a.jne(bad);
            EnterAsIfInterruptedAt(a, handler, hlt);
            a.Label(ref bad);
            a.mov(al, 1);
            a.@out(0xF4, al);
            a.Label(ref handler);
            InterruptCode.ReturnPastInterruptedHlt(a, hlt, counter);
            a.iretq();
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, run.Outcome.ToString());
        Assert.Equal(1UL, GuestMemoryExtensions.ReadUInt64(run.Vm.Memory, new GuestPhysAddr(counter)) & 0xFFFF_FFFF);
    }

    /// <summary>Enters <paramref name="handler"/> as an interrupt taken at <paramref name="rip"/> would:
    /// pushes SS, RSP, RFLAGS, CS and RIP, then jumps. Clobbers RAX and RCX.</summary>
    private static void EnterAsIfInterruptedAt(Assembler a, Label handler, Label rip)
    {
        a.mov(rax, rsp);
        a.mov(cx, ss);
        a.push(rcx);
        a.push(rax);
        a.pushfq();
        a.mov(cx, cs);
        a.push(rcx);
        a.lea(rax, __[rip]);
        a.push(rax);
        a.jmp(handler);
    }

    /// <summary>
    /// <see cref="InterruptCode.ReturnIfReplayed"/> on a processor: a genuine self-IPI (vector
    /// 0x42) runs the handler once, and an entry the guest makes itself while that handler runs
    /// (<see cref="EnterAsIfInterruptedAt"/>, as the box's replay comes) is counted apart as a
    /// replay and does not run the handler's body. Status 1: one genuine delivery and one replay;
    /// status 3 otherwise.
    /// </summary>
    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task Entries_no_processor_makes_are_told_from_a_genuine_interrupt(LapicMode lapic)
    {
        const ulong genuine = 0x9F940, busy = 0x9F944, replays = 0x9F948;
        var image = Long(a =>
        {
            var handler = a.CreateLabel();
            var hlt = a.CreateLabel();
            var nested = a.CreateLabel();
            var wait = a.CreateLabel();
            var bad = a.CreateLabel();
            SetGate(a, 0x42, handler);
            EnableApic(a);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x0004_0042);   // self-IPI, vector 0x42
            a.mov(rdi, (long)genuine);
            a.Label(ref wait);
            InterruptCode.SleepWithInterruptsOn(a, hlt);
            a.cli();
            a.cmp(__dword_ptr[rdi], 0);
            a.je(wait);
            a.cmp(__dword_ptr[rdi], 1);
            a.jne(bad);
            a.mov(rdi, (long)replays);
            a.cmp(__dword_ptr[rdi], 1);
            a.jne(bad);
            ExitPassedElseAt(a, bad);

            a.Label(ref handler);
            InterruptCode.ReturnPastInterruptedHlt(a, hlt);
            InterruptCode.ReturnIfReplayed(a, busy, replays);
            a.push(rax);
            a.push(rcx);
            a.push(rdi);
            a.mov(rdi, (long)genuine);
            a.inc(__dword_ptr[rdi]);
            EnterAsIfInterruptedAt(a, handler, nested);    // as the box does, inside this handler
            a.Label(ref nested);
            InterruptCode.Eoi(a);
            a.pop(rdi);
            a.pop(rcx);
            a.pop(rax);
            InterruptCode.LeaveReplayGuard(a, busy);
            a.iretq();
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, null, lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 },
            $"{run.Outcome}; {GuestMemoryExtensions.ReadUInt64(run.Vm.Memory, new GuestPhysAddr(genuine)) & 0xFFFF_FFFF} genuine, " +
            $"{GuestMemoryExtensions.ReadUInt64(run.Vm.Memory, new GuestPhysAddr(replays)) & 0xFFFF_FFFF} replays");
    }

    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task Self_ipi_interrupts_the_sender(LapicMode lapic)
    {
        var image = Long(a =>
        {
            var handler = a.CreateLabel();
            SetGate(a, 0x42, handler);
            EnableApic(a);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x0004_0042); // ICR: fixed, vector 0x42, shorthand self
            var hlt = WaitFlagThenExit(a);
            FlagHandler(a, handler, hlt);
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, null, lapic);
        Assert.Equal(VmProtocol.OutcomeKind.DebugExit, run.Outcome.Kind);
        Assert.Equal(1, run.Outcome.ExitCode);
    }

    /// <summary>
    /// TPR masking (SDM §10.8.3.1): a self-IPI of class 4 is made pending while interrupts are off,
    /// then the guest raises its task priority above it, with <paramref name="how"/>: the xAPIC TPR
    /// register or CR8. With interrupts on, the vector must not be taken; once the TPR is lowered,
    /// it must. Status 1: both held; status 3: the handler ran while the TPR forbade it.
    /// </summary>
    [KvmTheory]
    [KvmData(LapicMode.Emulated, "tpr")]
    [KvmData(LapicMode.Emulated, "cr8", NotInKvmBox = BoxLimits.Cr8WithInterruptWindow)]
    [KvmData(LapicMode.Assisted, "tpr")]
    [KvmData(LapicMode.Assisted, "cr8", NotInKvmBox = BoxLimits.Cr8WithInterruptWindow)]
    public async Task A_raised_task_priority_holds_back_a_pending_lower_vector_until_lowered(LapicMode lapic, string how)
    {
        var image = Long(a =>
        {
            var handler = a.CreateLabel();
            var linger = a.CreateLabel();
            var bad = a.CreateLabel();
            SetGate(a, 0x42, handler);
            EnableApic(a);
            a.cli();
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x0004_0042);     // self-IPI, vector 0x42 (class 4): pending
            if (how == "tpr") a.mov(__dword_ptr[rbx + 0x80], 0x50); // TPR class 5
            else
            {
                a.mov(eax, 5);
                a.mov(cr8, rax);                              // CR8 = TPR[7:4]
            }
            a.mov(ecx, 5_000);                                // ~5 ms with interrupts on
            a.sti();
            a.Label(ref linger);
            a.pause();
            a.dec(ecx);
            a.jnz(linger);
            a.cli();
            a.mov(rdi, (long)Flag);
            a.cmp(__byte_ptr[rdi], 0);
            a.jne(bad);
            if (how == "tpr") a.mov(__dword_ptr[rbx + 0x80], 0);
            else
            {
                a.xor(eax, eax);
                a.mov(cr8, rax);
            }
            var hlt = WaitFlagThenExit(a);
            a.Label(ref bad);
            a.mov(al, 1);
            a.@out(0xF4, al);
            FlagHandler(a, handler, hlt);
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, null, lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, run.Outcome.ToString());
    }

    /// <summary>
    /// The UART's interrupt through the IOAPIC, edge or level triggered (pin 4 → vector 0x24). With
    /// a level route the first handler only EOIs, leaving the line asserted: the IOAPIC must deliver
    /// again once Remote IRR is cleared by that EOI. The second handler clears the source (IIR read,
    /// IER off) and EOIs; the guest then reads the redirection entry back: Remote IRR (bit 14) must
    /// be clear. Status 1: two deliveries (level) or one (edge), Remote IRR clear; status 3 otherwise.
    /// Entries no processor makes are not counted as deliveries but apart
    /// (<see cref="InterruptCode.ReturnIfReplayed"/>). There must be none, except with KVM's local
    /// APICs in CI's KVM box, whose emulated SVM makes them now and then (seen: the IOAPIC sent two
    /// messages, KVM reported two EOIs, and the handler ran three times). There KVM alone injects, so
    /// no ActorVmm fault can look like one: a second message from the IOAPIC is a second genuine
    /// delivery. With the emulated APICs the vcpu injects, so none is allowed anywhere.
    /// </summary>
    [KvmTheory]
    [InlineData(LapicMode.Emulated, false)]
    [InlineData(LapicMode.Emulated, true)]
    [InlineData(LapicMode.Assisted, false)]
    [InlineData(LapicMode.Assisted, true)]
    public async Task The_uarts_interrupt_reaches_the_guest_through_the_ioapic(LapicMode lapic, bool level)
    {
        await using var run = await GuestRun.StartAsync(UartImage(level), 16 << 20, 1, null, lapic);
        await run.WaitAsync();
        var replays = GuestMemoryExtensions.ReadUInt64(run.Vm.Memory, new GuestPhysAddr(UartReplays)) & 0xFFFF_FFFF;
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 },
            $"{run.Outcome}; handler ran {GuestMemoryExtensions.ReadUInt64(run.Vm.Memory, new GuestPhysAddr(UartCounter)) & 0xFFFF_FFFF} times, {replays} replayed entries");
        if (!(KvmBox.Inside && lapic == LapicMode.Assisted)) Assert.Equal(0UL, replays);
    }

    private const ulong UartCounter = 0x9F910;
    private const ulong UartBusy = 0x9F914;      // the handler runs (byte)
    private const ulong UartReplays = 0x9F918;   // entries no processor makes (see ReturnIfReplayed)

    private static LongModeImage UartImage(bool level)
    {
        const ulong counter = UartCounter;
        return Long(a =>
        {
            var handler = a.CreateLabel();
            var bad = a.CreateLabel();
            var second = a.CreateLabel();
            var done = a.CreateLabel();
            SetGate(a, 0x24, handler);
            EnableApic(a);
            InterruptCode.RouteIoApicPin(a, 4, 0x24, levelTriggered: level);
            a.mov(dx, 0x3FC);
            a.mov(al, 0x08);                                       // MCR.OUT2
            a.@out(dx, al);
            a.mov(dx, 0x3F9);
            a.mov(al, 0x02);                                       // IER: transmitter empty (at once)
            a.@out(dx, al);
            var hlt = a.CreateLabel();
            a.mov(rsi, (long)counter);
            InterruptCode.SleepUntilCountThenLinger(a, level ? 2 : 1, hlt);
            a.cmp(__dword_ptr[rsi], level ? 2 : 1);
            a.jne(bad);
            InterruptCode.JumpIfRemoteIrr(a, 4, bad);
            ExitPassedElseAt(a, bad);

            a.Label(ref handler);
            InterruptCode.ReturnPastInterruptedHlt(a, hlt);
            InterruptCode.ReturnIfReplayed(a, UartBusy, UartReplays);
            a.push(rax);
            a.push(rdx);
            a.push(rdi);
            a.mov(rdi, (long)counter);
            a.inc(__dword_ptr[rdi]);
            if (level)
            {
                a.cmp(__dword_ptr[rdi], 2);
                a.jb(done);                                        // the first time: the line stays up
            }
            a.Label(ref second);
            a.mov(dx, 0x3FA);                                      // IIR: clears transmitter-empty
            a.@in(al, dx);
            a.mov(dx, 0x3F9);
            a.xor(al, al);
            a.@out(dx, al);                                        // IER off
            a.Label(ref done);
            InterruptCode.Eoi(a);
            a.pop(rdi);
            a.pop(rdx);
            a.pop(rax);
            InterruptCode.LeaveReplayGuard(a, UartBusy);
            a.iretq();
        });
    }

    /// <summary>The BSP's part: copy the 16-bit <paramref name="trampoline"/> to 0x9000, enable its APIC, INIT then SIPI (vector 0x09).</summary>
    private static void StartAps(Assembler a, Label trampoline, int length, uint destination, uint shorthand) =>
        InterruptCode.StartAps(a, trampoline, length, Trampoline, destination, shorthand);

    private static byte[] Assemble16(Action<Assembler> body)
    {
        var a = new Assembler(16);
        body(a);
        return GuestCode.Assemble(a, Trampoline);
    }

    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task Init_sipi_brings_up_three_aps_that_print_their_apic_ids(LapicMode lapic)
    {
        // Each AP (real mode, DS = 0): its APIC ID from CPUID.01H:EBX[31:24], printed under a lock.
        var ap = Assemble16(a =>
        {
            var spin = a.CreateLabel();
            var thre = a.CreateLabel();
            var stop = a.CreateLabel();
            a.cli();
            a.xor(ax, ax);
            a.mov(ds, ax);
            a.mov(eax, 1);
            a.cpuid();
            a.shr(ebx, 24);
            a.add(bl, (byte)'0');
            a.Label(ref spin);
            a.mov(al, 1);
            a.xchg(__byte_ptr[ApLock], al);
            a.test(al, al);
            a.jnz(spin);
            a.Label(ref thre);
            a.mov(dx, 0x3FD);
            a.@in(al, dx);
            a.test(al, 0x20);
            a.jz(thre);
            a.mov(dx, 0x3F8);
            a.mov(al, bl);
            a.@out(dx, al);
            a.inc(__word_ptr[ApCount]);
            a.mov(__byte_ptr[ApLock], 0);
            a.Label(ref stop);
            a.hlt();
            a.jmp(stop);
        });
        var image = Long(a =>
        {
            var trampoline = a.CreateLabel();
            var wait = a.CreateLabel();
            StartAps(a, trampoline, ap.Length, destination: 0, shorthand: 0b11 << 18); // all excluding self
            a.mov(rdi, (long)ApCount);
            a.Label(ref wait);
            a.pause();
            a.cmp(__word_ptr[rdi], 3);
            a.jne(wait);
            a.mov(al, 0);
            a.@out(0xF4, al);
            a.Label(ref trampoline);
            a.db(ap);
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 4, null, null, lapic);
        Assert.Equal(VmProtocol.OutcomeKind.DebugExit, run.Outcome.Kind);
        Assert.Equal(1, run.Outcome.ExitCode);
        Assert.Equal("123", new string(run.Serial.Order().ToArray()));
    }

    /// <summary>vcpu 1's code (real mode, x2APIC): "ready", then sleep; its handler for vector 0x40
    /// ends the VM with debug-exit status (0x21 &lt;&lt; 1) | 1.</summary>
    private static byte[] IpiTarget() => InterruptCode.ApTrampoline(Trampoline, 0x40,
        a => a.mov(__byte_ptr[ApReady], 1),
        a =>
        {
            a.mov(al, 0x21);
            a.@out(0xF4, al);
            a.hlt();
        });

    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task Ipi_from_vcpu0_runs_a_handler_on_vcpu1_that_writes_a_port(LapicMode lapic)
    {
        var ap = IpiTarget();
        var image = Long(a =>
        {
            var trampoline = a.CreateLabel();
            var wait = a.CreateLabel();
            var spin = a.CreateLabel();
            StartAps(a, trampoline, ap.Length, destination: 1, shorthand: 0);
            a.mov(rdi, (long)ApReady);
            a.Label(ref wait);
            a.pause();
            a.cmp(__byte_ptr[rdi], 1);
            a.jne(wait);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrHigh], 1 << 24);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x40); // fixed, vector 0x40, physical APIC 1
            a.Label(ref spin);
            a.pause();
            a.jmp(spin);
            a.Label(ref trampoline);
            a.db(ap);
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 2, null, null, lapic);
        Assert.Equal(VmProtocol.OutcomeKind.DebugExit, run.Outcome.Kind);
        Assert.Equal((0x21 << 1) | 1, run.Outcome.ExitCode);
    }
    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task Lapic_timer_periodic_interrupts_the_guest_again_and_again(LapicMode lapic)
    {
        var image = Long(a =>
        {
            var handler = a.CreateLabel();
            var wait = a.CreateLabel();
            SetGate(a, 0x41, handler);
            EnableApic(a);
            a.mov(__dword_ptr[rbx + ApicOffsets.TimerDivide], 0b1011);    // divide by 1
            a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x2_0041);  // LVT timer: periodic, vector 0x41
            a.mov(__dword_ptr[rbx + ApicOffsets.TimerInitialCount], 500_000);   // every 500 µs at 1 GHz
            var hlt = a.CreateLabel();
            a.mov(rsi, (long)Flag);
            a.Label(ref wait);
            InterruptCode.SleepWithInterruptsOn(a, hlt);
            a.cli();
            a.cmp(__dword_ptr[rsi], 5);                 // five expiries, each taken in a handler
            a.jb(wait);
            a.mov(__dword_ptr[rbx + ApicOffsets.LvtTimer], 0x1_0041);  // masked
            a.mov(al, 0);
            a.@out(0xF4, al);
            a.Label(ref handler);
            InterruptCode.ReturnPastInterruptedHlt(a, hlt);
            a.push(rdi);
            a.mov(rdi, (long)Flag);
            a.inc(__dword_ptr[rdi]);
            a.mov(rdi, LapicBase);
            a.mov(__dword_ptr[rdi + 0xB0], 0);
            a.pop(rdi);
            a.iretq();
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, null, lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, run.Outcome.ToString());
    }

    [KvmTheory]
    [KvmData(LapicMode.Emulated)]
    [KvmData(LapicMode.Assisted, NotInKvmBox = BoxLimits.NmiIpiFromKvmApic)]
    public async Task An_nmi_sent_to_its_own_apic_id_runs_the_nmi_handler(LapicMode lapic)
    {
        var image = Long(a =>
        {
            var nmi = a.CreateLabel();
            SetGate(a, 2, nmi);                              // vector 2: NMI
            EnableApic(a);
            // ICR: delivery mode NMI to physical APIC 0, itself. (Not with the self shorthand, which
            // takes fixed only: SDM Vol 3A Table 10-3.)
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrHigh], 0);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x0000_0400);
            var hlt = WaitFlagThenExit(a);                   // (an NMI comes even with IF=0)
            a.Label(ref nmi);
            InterruptCode.ReturnPastInterruptedHlt(a, hlt);
            a.push(rdi);
            a.mov(rdi, (long)Flag);
            a.mov(__byte_ptr[rdi], 1);
            a.pop(rdi);
            a.iretq();                                       // no EOI for an NMI
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, null, lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, run.Outcome.ToString());
    }

    private const ushort ApsReady = 0x8F10;  // real-mode DS = 0: APs that took their place
    private const ushort Hits = 0x8F14;      // APs whose handler ran

    /// <summary>An AP for a broadcast: its own stack (by APIC ID), counted in <see cref="ApsReady"/>;
    /// its handler for vector 0x40 counts itself in <see cref="Hits"/> and EOIs.</summary>
    private static byte[] BroadcastTarget() => InterruptCode.ApTrampoline(Trampoline, 0x40,
        a =>
        {
            a.mov(ecx, 0x802);             // x2APIC ID
            a.rdmsr();
            a.shl(ax, 8);
            a.mov(sp, 0x8E00);
            a.sub(sp, ax);                 // 256 bytes of stack per APIC ID
            a.@lock.inc(__byte_ptr[ApsReady]);
        },
        a =>
        {
            a.push(eax);
            a.push(ecx);
            a.push(edx);
            a.@lock.inc(__byte_ptr[Hits]);
            InterruptCode.X2ApicEoi(a);
            a.pop(edx);
            a.pop(ecx);
            a.pop(eax);
            a.iret();
        });

    /// <summary>A fixed IPI with the all-excluding-self shorthand reaches every other vcpu once and
    /// not the sender (whose handler for the vector would end the run with status 3).</summary>
    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task A_fixed_broadcast_to_all_excluding_self_reaches_every_other_vcpu_once(LapicMode lapic)
    {
        var ap = BroadcastTarget();
        var image = Long(a =>
        {
            var trampoline = a.CreateLabel();
            var ready = a.CreateLabel();
            var hit = a.CreateLabel();
            var linger = a.CreateLabel();
            var bad = a.CreateLabel();
            var self = a.CreateLabel();
            SetGate(a, 0x40, self);
            StartAps(a, trampoline, ap.Length, destination: 0, shorthand: 0xC_0000); // INIT-SIPI to all but self
            a.Label(ref ready);
            a.pause();
            a.cmp(__byte_ptr[ApsReady], 2);
            a.jb(ready);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0xC_0040);     // fixed, vector 0x40, all excluding self
            a.sti();
            a.Label(ref hit);
            a.pause();
            a.cmp(__byte_ptr[Hits], 2);
            a.jb(hit);
            a.mov(ecx, 5_000);                              // a late third delivery would show now
            a.Label(ref linger);
            a.pause();
            a.dec(ecx);
            a.jnz(linger);
            a.cmp(__byte_ptr[Hits], 2);
            a.jne(bad);
            ExitPassedElseAt(a, bad);
            a.Label(ref self);                              // the sender took its own broadcast
            a.mov(al, 1);
            a.@out(0xF4, al);
            a.Label(ref trampoline);
            a.db(ap);
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 3, null, null, lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, run.Outcome.ToString());
    }
    /// <summary>
    /// Bad input from a guest (SDM Vol 3A §10.5.3, §10.6.1): a fixed IPI with an illegal vector (below
    /// 16), an IPI to an APIC ID nobody has, a write to a reserved register offset. None is delivered
    /// and the VM goes on. The emulated APIC records them in ESR as the SDM says (Send Illegal
    /// Vector, bit 5; Illegal Register Address, bit 7); KVM's own APIC (assisted) sets no ESR bits
    /// for them, so there only "not delivered, VM goes on" is checked. Status 1: no handler ran.
    /// </summary>
    [KvmTheory]
    [MemberData(nameof(LapicModes))]
    public async Task A_guests_bad_apic_writes_deliver_nothing_and_set_the_esr_bits_the_sdm_names(LapicMode lapic)
    {
        const ulong esrOut = 0x9F920;
        var image = Long(a =>
        {
            var handler = a.CreateLabel();
            var linger = a.CreateLabel();
            var bad = a.CreateLabel();
            SetGate(a, 0x05, handler);
            SetGate(a, 0x50, handler);
            EnableApic(a);
            a.mov(__dword_ptr[rbx + ApicOffsets.Esr], 0);              // ESR: latch (and clear) what came before
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrHigh], 0);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x05);           // fixed, vector 5 (illegal), to APIC 0
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrHigh], 7 << 24);
            a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], 0x50);           // fixed, vector 0x50, to APIC 7: nobody
            a.mov(__dword_ptr[rbx + 0x3F0], 0x1234);         // a reserved offset
            a.mov(ecx, 5_000);
            a.sti();
            a.Label(ref linger);
            a.pause();
            a.dec(ecx);
            a.jnz(linger);
            a.cli();
            a.mov(__dword_ptr[rbx + ApicOffsets.Esr], 0);              // ESR: latch the errors since the last write
            a.mov(eax, __dword_ptr[rbx + ApicOffsets.Esr]);
            a.mov(rdi, (long)esrOut);
            a.mov(__dword_ptr[rdi], eax);
            a.mov(rdi, (long)Flag);
            a.cmp(__byte_ptr[rdi], 0);
            a.jne(bad);
            ExitPassedElseAt(a, bad);
            FlagHandler(a, handler);
        });
        await using var run = await GuestRun.RunAsync(image, 16 << 20, 1, null, null, lapic);
        Assert.True(run.Outcome is { Kind: VmProtocol.OutcomeKind.DebugExit, ExitCode: 1 }, run.Outcome.ToString());
        var esr = GuestMemoryExtensions.ReadUInt64(run.Vm.Memory, new GuestPhysAddr(esrOut)) & 0xFFFF_FFFF;
        if (lapic == LapicMode.Emulated) Assert.Equal(0xA0UL, esr);
    }
}
