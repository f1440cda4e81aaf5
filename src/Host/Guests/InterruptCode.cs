using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.Lapic;
using Iced.Intel;
using static Iced.Intel.AssemblerRegisters;

namespace ActorVmm.Host.Guests;

/// <summary>
/// Pieces of 64-bit guest code (for <see cref="LongModeImage"/> guests) that take interrupts: an
/// IDT in low memory, the local APIC at its default base, IOAPIC routes. Shared by the demo, the
/// guest tests and the benchmarks. Interrupts reach such guests as injected external interrupts
/// through the IDT; they never raise them with <c>int n</c> (see DESIGN §4).
/// </summary>
public static class InterruptCode
{
    /// <summary>256 gates of 16 bytes at 0x8000-0x8FFF.</summary>
    public const ulong Idt = 0x8000;
    /// <summary>The limit and base that <c>lidt</c> loads.</summary>
    public const ulong Idtr = 0x9F800;
    public const long LapicBase = (long)Platform.LocalApicBase;
    public const long IoApicBase = (long)Platform.IoApicBase;

    /// <summary>IDT gate <paramref name="vector"/> → <paramref name="handler"/> (64-bit interrupt
    /// gate, the image's code selector), then lidt. Clobbers RAX and RDI.</summary>
    public static void SetGate(Assembler a, byte vector, Label handler)
    {
        a.lea(rax, __[handler]);
        a.mov(rdi, (long)(Idt + vector * 16UL));
        a.mov(__word_ptr[rdi], ax);
        a.mov(__word_ptr[rdi + 2], LongModeImage.CodeSelector);
        a.mov(__word_ptr[rdi + 4], 0x8E00);              // present, DPL 0, 64-bit interrupt gate
        a.shr(rax, 16);
        a.mov(__word_ptr[rdi + 6], ax);
        a.shr(rax, 16);
        a.mov(__dword_ptr[rdi + 8], eax);
        a.mov(__dword_ptr[rdi + 12], 0);
        a.mov(rdi, (long)Idtr);
        a.mov(__word_ptr[rdi], 0xFFF);
        a.mov(rax, (long)Idt);
        a.mov(__qword_ptr[rdi + 2], rax);
        a.lidt(__[rdi]);
    }

    /// <summary>RBX = the local APIC page; SVR = 0x1FF (software enabled, spurious vector 0xFF).</summary>
    public static void EnableLocalApic(Assembler a)
    {
        a.mov(rbx, LapicBase);
        a.mov(__dword_ptr[rbx + ApicOffsets.Svr], 0x1FF);
    }

    /// <summary>
    /// <c>sti; hlt</c>, with <paramref name="hlt"/> placed on the <c>hlt</c>: sleep until an
    /// interrupt, with interrupts open only for that sleep. A processor takes no interrupt between
    /// the two (STI's interrupt shadow covers the <c>hlt</c>), so an interrupt already pending at the
    /// <c>sti</c> wakes the <c>hlt</c> at once. Handlers that may end such a sleep start with
    /// <see cref="ReturnPastInterruptedHlt"/> for guests that run where the shadow can be lost.
    /// </summary>
    public static void SleepWithInterruptsOn(Assembler a, Label hlt)
    {
        a.sti();
        a.Label(ref hlt);
        a.hlt();
    }

    /// <summary>
    /// A handler's first instructions (nothing pushed yet, no error code): if the interrupted RIP is
    /// the <c>hlt</c> of <see cref="SleepWithInterruptsOn"/>, the interrupt came inside STI's shadow,
    /// where no processor delivers one; returning to that <c>hlt</c> would sleep with nothing left to
    /// wake it, so the handler returns past it (the one byte of <c>hlt</c>), as if the interrupt had
    /// woken it. If <paramref name="counter"/> is given, the 32-bit count there is raised each time.
    /// On a processor this never fires; the KVM box's emulated SVM loses the shadow now and then
    /// (README, the box's limits). Keeps every register; the flags it changes come back with <c>iretq</c>.
    /// </summary>
    public static void ReturnPastInterruptedHlt(Assembler a, Label hlt, ulong? counter = null)
    {
        var onTime = a.CreateLabel();
        a.push(rdi);
        a.lea(rdi, __[hlt]);
        a.cmp(__qword_ptr[rsp + 8], rdi);   // the interrupted RIP
        a.jne(onTime);
        a.inc(__qword_ptr[rsp + 8]);
        if (counter is { } count)
        {
            a.mov(rdi, (long)count);
            a.inc(__dword_ptr[rdi]);
        }
        a.Label(ref onTime);
        a.pop(rdi);
    }

    /// <summary>
    /// A handler's first instructions (after <see cref="ReturnPastInterruptedHlt"/>, if any), for
    /// guests that count their interrupts exactly: an entry into the handler while that handler
    /// runs is counted at <paramref name="replays"/> (32 bits) and returned from at once, with no
    /// EOI. No processor makes such an entry: the handler is reached through an interrupt gate (IF
    /// cleared until its <c>iretq</c>), and its fixed vector stays in service until the EOI, which
    /// holds back every vector of its priority class (SDM Vol 3A §10.8.3.1, §6.8.1).
    /// <paramref name="busy"/>, a byte, marks a running handler. The KVM box's emulated SVM now and
    /// then delivers an interrupt a second time after KVM acknowledged it once, in the middle of
    /// its handler (docs/kvm-hosts.md); that is what this catches. The check reads guest memory
    /// only: the ISR as the handler reads it is not a usable witness, since on kvm_pvm with KVM's
    /// local APIC a genuine handler reads its vector's ISR bit as 0. The handler must end with
    /// <see cref="LeaveReplayGuard"/> just before its <c>iretq</c>. Keeps every register.
    /// </summary>
    public static void ReturnIfReplayed(Assembler a, ulong busy, ulong replays)
    {
        var replayed = a.CreateLabel();
        var genuine = a.CreateLabel();
        a.push(rdi);
        a.mov(rdi, (long)busy);
        a.cmp(__byte_ptr[rdi], 0);
        a.jne(replayed);
        a.mov(__byte_ptr[rdi], 1);
        a.pop(rdi);
        a.jmp(genuine);
        a.Label(ref replayed);
        a.mov(rdi, (long)replays);
        a.inc(__dword_ptr[rdi]);
        a.pop(rdi);
        a.iretq();
        a.Label(ref genuine);
    }

    /// <summary>The end of a handler that began with <see cref="ReturnIfReplayed"/>: clears
    /// <paramref name="busy"/>; the <c>iretq</c> comes next. Keeps every register.</summary>
    public static void LeaveReplayGuard(Assembler a, ulong busy)
    {
        a.push(rdi);
        a.mov(rdi, (long)busy);
        a.mov(__byte_ptr[rdi], 0);
        a.pop(rdi);
    }

    /// <summary>End of interrupt to the local APIC. Clobbers RDI.</summary>
    public static void Eoi(Assembler a)
    {
        a.mov(rdi, LapicBase);
        a.mov(__dword_ptr[rdi + ApicOffsets.Eoi], 0);
    }

    /// <summary>IOAPIC pin <paramref name="pin"/> → <paramref name="vector"/>: fixed delivery, physical
    /// destination APIC 0, edge- or <paramref name="levelTriggered"/>, active high, unmasked. Clobbers RDI.</summary>
    public static void RouteIoApicPin(Assembler a, int pin, byte vector, bool levelTriggered = false)
    {
        a.mov(rdi, IoApicBase);
        a.mov(__dword_ptr[rdi], 0x10 + 2 * pin + 1);     // IOREGSEL: high half of the entry
        a.mov(__dword_ptr[rdi + 0x10], 0);               // IOWIN: destination APIC 0
        a.mov(__dword_ptr[rdi], 0x10 + 2 * pin);         // low half
        a.mov(__dword_ptr[rdi + 0x10], vector | (levelTriggered ? 1 << 15 : 0)); // vector, fixed, unmasked
    }

    /// <summary>Jumps to <paramref name="target"/> if the Remote IRR bit (14) of IOAPIC pin
    /// <paramref name="pin"/>'s redirection entry is set. Clobbers EAX and RDI.</summary>
    public static void JumpIfRemoteIrr(Assembler a, int pin, Label target)
    {
        a.mov(rdi, IoApicBase);
        a.mov(__dword_ptr[rdi], 0x10 + 2 * pin);
        a.mov(eax, __dword_ptr[rdi + 0x10]);
        a.test(eax, 1 << 14);
        a.jnz(target);
    }

    /// <summary>
    /// Sleeps (<see cref="SleepWithInterruptsOn"/>, its <c>hlt</c> at <paramref name="hlt"/>) until the
    /// 32-bit count at [RSI] is at least <paramref name="expected"/>, then keeps interrupts on for
    /// <paramref name="iterations"/> pauses, so that a late extra delivery would show, and returns
    /// with interrupts off. Clobbers ECX.
    /// </summary>
    public static void SleepUntilCountThenLinger(Assembler a, int expected, Label hlt, int iterations = 5_000)
    {
        var wait = a.CreateLabel();
        var linger = a.CreateLabel();
        a.Label(ref wait);
        SleepWithInterruptsOn(a, hlt);
        a.cli();
        a.cmp(__dword_ptr[rsi], expected);
        a.jb(wait);
        a.mov(ecx, iterations);
        a.sti();
        a.Label(ref linger);
        a.pause();
        a.dec(ecx);
        a.jnz(linger);
        a.cli();
    }

    /// <summary>
    /// Real-mode code for an AP that a SIPI starts at <paramref name="origin"/> (a page boundary below
    /// 1 MiB; CS = origin >> 4, DS = SS = 0): IVT entry <paramref name="vector"/> → its handler, stack at
    /// 0x8E00, x2APIC on (IA32_APIC_BASE.EXTD, so that its registers are MSRs), SVR = 0x1FF; then
    /// <paramref name="setup"/> (e.g. announce "ready", move the stack) and sleep with interrupts on.
    /// <paramref name="handler"/> is the handler's body, ending in <c>iret</c>. The handler's offset is
    /// found by assembling twice (the IVT entry names it before it is placed).
    /// </summary>
    public static byte[] ApTrampoline(ulong origin, byte vector, Action<Assembler> setup, Action<Assembler> handler)
    {
        byte[] Assemble(ushort handlerOffset, out ushort handlerAt)
        {
            var a = new Assembler(16);
            var entry = a.CreateLabel();
            var sleep = a.CreateLabel();
            a.cli();
            a.xor(ax, ax);
            a.mov(ds, ax);
            a.mov(ss, ax);
            a.mov(sp, 0x8E00);
            a.mov(__word_ptr[vector * 4], handlerOffset);
            a.mov(__word_ptr[vector * 4 + 2], (ushort)(origin >> 4));
            a.mov(ecx, 0x1B);              // IA32_APIC_BASE
            a.rdmsr();
            a.or(eax, 0xC00);              // EN | EXTD
            a.wrmsr();
            a.mov(ecx, 0x80F);             // x2APIC SVR
            a.mov(eax, 0x1FF);
            a.xor(edx, edx);
            a.wrmsr();
            setup(a);
            a.Label(ref sleep);
            a.sti();
            a.hlt();
            a.jmp(sleep);
            a.Label(ref entry);
            handler(a);
            using var stream = new MemoryStream();
            var result = a.Assemble(new StreamCodeWriter(stream), origin, BlockEncoderOptions.ReturnNewInstructionOffsets);
            handlerAt = (ushort)(result.GetLabelRIP(entry) - origin);
            return stream.ToArray();
        }

        Assemble(0, out var at);
        var code = Assemble(at, out var again);
        if (again != at) throw new InvalidOperationException("the AP's handler moved between the two passes");
        return code;
    }

    /// <summary>
    /// The BSP's part of bringing up APs (SDM Vol 3A §8.4.4.1): copies <paramref name="length"/> bytes
    /// of 16-bit code from <paramref name="trampoline"/> to <paramref name="origin"/> (a page below
    /// 1 MiB), enables its local APIC (RBX = the page), then sends INIT (level assert) and a SIPI
    /// with vector origin >> 12 to <paramref name="destination"/> (physical APIC ID) or by
    /// <paramref name="shorthand"/> (ICR bits 19:18, in place). Clobbers RCX, RSI, RDI.
    /// </summary>
    public static void StartAps(Assembler a, Label trampoline, int length, ulong origin, uint destination, uint shorthand)
    {
        a.lea(rsi, __[trampoline]);
        a.mov(rdi, (long)origin);
        a.mov(ecx, length);
        a.rep.movsb();
        EnableLocalApic(a);
        a.mov(__dword_ptr[rbx + ApicOffsets.IcrHigh], destination << 24);
        a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], shorthand | 0x4500);                     // INIT, level assert
        a.mov(__dword_ptr[rbx + ApicOffsets.IcrLow], shorthand | 0x4600 | (uint)(origin >> 12)); // SIPI
    }

    /// <summary>x2APIC EOI (WRMSR 0x80B ← 0), in real mode. Clobbers EAX, ECX, EDX.</summary>
    public static void X2ApicEoi(Assembler a)
    {
        a.mov(ecx, 0x80B);
        a.xor(eax, eax);
        a.xor(edx, edx);
        a.wrmsr();
    }
}
