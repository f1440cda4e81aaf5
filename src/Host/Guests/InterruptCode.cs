using ActorVmm.Devices;
using ActorVmm.Host.Boot;
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

    // Local APIC registers (offsets in its page; Intel SDM Vol 3A Table 11-1).
    public const int LapicEoi = 0xB0, LapicSvr = 0xF0, LapicIcrLow = 0x300, LapicIcrHigh = 0x310;
    public const int LapicLvtTimer = 0x320, LapicTimerInitial = 0x380, LapicTimerDivide = 0x3E0;

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
        a.mov(__dword_ptr[rbx + LapicSvr], 0x1FF);
    }

    /// <summary>End of interrupt to the local APIC. Clobbers RDI.</summary>
    public static void Eoi(Assembler a)
    {
        a.mov(rdi, LapicBase);
        a.mov(__dword_ptr[rdi + LapicEoi], 0);
    }

    /// <summary>IOAPIC pin <paramref name="pin"/> → <paramref name="vector"/>: fixed delivery, physical
    /// destination APIC 0, edge-triggered, active high, unmasked. Clobbers RDI.</summary>
    public static void RouteIoApicPin(Assembler a, int pin, byte vector)
    {
        a.mov(rdi, IoApicBase);
        a.mov(__dword_ptr[rdi], 0x10 + 2 * pin + 1);     // IOREGSEL: high half of the entry
        a.mov(__dword_ptr[rdi + 0x10], 0);               // IOWIN: destination APIC 0
        a.mov(__dword_ptr[rdi], 0x10 + 2 * pin);         // low half
        a.mov(__dword_ptr[rdi + 0x10], vector);          // vector, fixed, edge, unmasked
    }
}
